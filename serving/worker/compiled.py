"""Compiled decode steps for the engine: ``torch.compile`` without paying for it at start-up.

Why: at batch 1-16 an eager decode step runs at a fraction of its roofline; the rest is per-op
dispatch (one Student step at batch 1 launches some 630 aten calls). Inductor fuses the pointwise
ops and drops most of the dispatch (``benchmarks/compiled_decode.py``).

How:

- **One compiled step per signature, not per shape.** :func:`decode_logits` is compiled with
  dynamic shapes: the batch size, the context length and the integers of the FFN plan (which
  hidden units run for which rows, :func:`matta.model.ffn_plan`) are symbols, so one compiled step
  serves every batch, context and width mix of one structure. What stays static is
  :func:`step_signature` (the number of FFN blocks per layer, and sizes of 1, which dynamo
  specialises); a model with four widths has eight (:func:`representative_rows`).
- **Compiled ahead, in another process.** Each signature is compiled with dynamo's ahead-of-time
  path (``aot_compile``) and saved to a file under ``cache_dir/torch-<version>/<architecture>``. A
  compiled step takes the weights as inputs, so a restart, and any checkpoint of the same shape,
  loads it from there in a fraction of a second; nothing is traced in the serving process. With
  ``compile="background"`` a worker (``python -m serving.worker.compile_worker``, nice'd, the engine's thread
  count) compiles what the cache lacks while the engine serves eager steps: the engine answers
  from its first request, and no compile holds its GIL.
- **Swapped in between steps.** Steps already in the cache are loaded before the engine serves;
  a step the worker finishes later is loaded at an iteration boundary that the scheduler chooses
  (one whose deadlines survive the pause, :mod:`serving.engine.scheduler`), and from then on steps of that
  signature run compiled. A loaded step checks its guards on every
  call (dtypes, ranks, the plan's structure); inputs it refuses run eager.

``compile="require"`` compiles (or loads) every signature before the engine starts: start-up pays
the compile, a failure stops the server. On CUDA the same steps compile to Triton kernels (never run
on this project's CPU-only machines; their test is marked ``gpu``). They do not capture CUDA graphs:
a graph replays fixed shapes at fixed addresses, and this step's shapes change every step (the
attention reads the cache up to its filled length) while it writes the KV cache, a plain input, in
place; inductor's ``triton.cudagraphs`` would record a new graph per (batch, context) or skip the
step. CUDA graphs per batch bucket, as vLLM captures them, need a decode step of fixed shapes:
attention over the whole cache buffer under a mask, the write position and row widths as device
tensors rather than sizes, rows padded to the bucket, cache buffers at static addresses.

The cache directory is created owner-only and refused when anyone else could write it: it holds
compiled code and torch's serialized compile state. Each artifact is one file, a header line (the
format, torch's version, the payload's length and sha256) and torch's payload, written to a temporary
file and renamed into place (one rename: no torn pair of files); :func:`read_artifact` checks all of
it before torch sees a byte. A truncated, empty, garbage, other-torch or unreadable artifact, or a
write that fails (a full disk), is a :class:`CacheFault`: one warning, one count in
``CompileStatus.faults`` (``matta_compile_cache_faults_total{kind}``), and that signature runs eager
(a bad artifact is compiled again, in the worker or, with ``require``, at start-up).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from matta.config import ModelConfig
from matta.kv_cache import StaticKVCache
from matta.model import FFNBlocks, NestedGPT, ffn_plans
from serving.lifecycle import spawn_options
from serving.settings import CompileMode
from serving.worker.compile_cache import (
    CacheFault,
    artifact_fault,
    artifact_path,
    cache_dir_for,
    check_private,
    default_cache_dir,
    read_artifact,
    write_artifact,
)

log = logging.getLogger(__name__)

COMPILE_MODES: tuple[str, ...] = typing.get_args(CompileMode)
WORKER_COMMAND = (sys.executable, "-m", "serving.worker.compile_worker")

Plans = Sequence["int | FFNBlocks"]


def decode_logits(model: NestedGPT, ids: torch.Tensor, mask: torch.Tensor | None, cache: StaticKVCache,
                  plans: Plans) -> torch.Tensor:
    """The engine's decode step: one new token per row (``ids`` (B, 1)) against ``cache``, which it
    extends in place, each row at its own length; ``mask`` (B, cached + 1), when given, marks real
    tokens of a left-padded cache (the engine's rows have none). Returns the new token's logits (B, V).

    This is the function :func:`compile_step` compiles, and what runs eager."""
    out = model(ids, plans=plans, attention_mask=mask, past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


def step_signature(batch: int, plans: Plans) -> tuple:
    """What decides which compiled graph a step needs. Everything else (batch size, context, the
    plan's unit and row counts) is a symbol of the graph; dynamo specialises a size of 1, and the
    number of FFN blocks is the graph's structure. Rows are sorted widest first, so only the last
    block (the widest width's rows) can hold a single row."""
    layers = tuple(None if isinstance(p, int) else tuple(rows == 1 for _, _, rows in p) for p in plans)
    return (batch == 1, layers)


def rows_signature(config: ModelConfig, rows: Sequence[str]) -> tuple:
    """The signature of a step over rows of widths ``rows`` (widest first)."""
    return step_signature(len(rows), ffn_plans(config, rows))


def representative_rows(config: ModelConfig, max_batch: int) -> list[list[str]]:
    """One row-width list (widest first) for every step signature the engine can meet, most common
    first: one width at batch >= 2 and at batch 1, then mixes of 2, 3, ... widths, the widest of
    them on two rows and on one, the others on one each."""
    by_size = sorted(config.served_widths, key=lambda w: -sum(config.resolve_width(w)))
    narrowest = by_size[-1]
    cases = [[narrowest] * min(2, max_batch), [narrowest]]
    for k in range(2, len(by_size) + 1):
        for subset in itertools.combinations(by_size, k):
            for top in (2, 1):
                rows = [subset[0]] * top + list(subset[1:])  # every lower block then has >= 2 rows
                if len(rows) <= max_batch:
                    cases.append(rows)
    seen: dict[tuple, list[str]] = {}
    for rows in cases:
        seen.setdefault(rows_signature(config, rows), rows)
    return list(seen.values())


def configure(cache_dir: Path) -> None:
    """Settings of a process that compiles steps (inductor's own on-disk caches go under
    ``cache_dir`` too). Call before the first compile; it imports dynamo and inductor (seconds)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    import_compiler()
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    # Distinct symbols for equal sizes: a batch that happens to equal a row count must not tie them.
    fx_config.use_duck_shape = False
    # Floats (LayerNorm eps) as constants: a symbolic float makes dynamo trace the step twice.
    torch._dynamo.config.specialize_float = True
    inductor_config.fx_graph_cache = True
    inductor_config.compile_threads = 1  # a 2-core machine: no pool of compiler processes


def import_compiler() -> None:
    """Import what compiling or loading a step needs (about 2 s on this machine, so not at start-up
    in background mode)."""
    import torch._dynamo
    import torch._dynamo.aot_compile
    import torch._inductor.compile_fx  # noqa: F401


@torch.inference_mode()
def step_inputs(model: NestedGPT, rows: Sequence[str], context: int = 8):
    """Arguments of :func:`decode_logits` after ``model`` for one step of ``rows`` (widest first) at
    ``context`` tokens, random ids, made as the engine makes them (inference mode): what a step is
    compiled with."""
    config = model.config
    device = model.wte.weight.device
    generator = torch.Generator().manual_seed(0)
    batch = len(rows)
    ids = torch.randint(0, config.vocab_size, (batch, context - 1), generator=generator).to(device)
    mask = torch.ones(batch, context - 1, dtype=torch.long, device=device)
    cache = StaticKVCache.from_list(model(ids, row_widths=rows, attention_mask=mask, use_cache=True).past_key_values,
                                    capacity=2 * context)
    if batch > 1:  # rows of their own lengths, as the engine's are
        cache.slot_lengths[0] -= 1
        cache.set_batch_size(batch)
    # Free slots past the live rows, as the engine's cache keeps: traced with exactly one slot, a
    # batch-1 step would be specialised to a one-slot cache and refuse every engine cache.
    cache.reserve(0, 0, batch + 2)
    step_ids = torch.randint(0, config.vocab_size, (batch, 1), generator=generator).to(device)
    return step_ids, None, cache, ffn_plans(config, rows, device)


def compile_step(model: NestedGPT, rows: Sequence[str], path: Path) -> None:
    """Compile :func:`decode_logits` for the signature of ``rows`` (dynamic shapes: batch, context
    and plan integers are symbols) and save it to ``path`` (on CUDA without CUDA graphs: see the module doc).
    Raises :class:`CacheFault` ("write") when it cannot be saved."""
    with torch.inference_mode():
        step = torch.compile(decode_logits, fullgraph=True, dynamic=True)
        compiled = step.aot_compile(((model, *step_inputs(model, rows)), {}))
    write_artifact(path, type(compiled).serialize(compiled).serialized_data)


def load_step(path: Path):
    """A step saved by :func:`compile_step`; calling it checks its guards and raises on a mismatch.
    Raises :class:`CacheFault` for an artifact that fails :func:`read_artifact`'s checks."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    payload = read_artifact(path)
    # Loaded in inference mode, as it was compiled and as the engine calls it: the guards rebuilt
    # here take the tensors' expected dispatch keys from the mode they are built in.
    with torch.inference_mode():
        return AOTCompiledFunction.deserialize(payload, decode_logits.__globals__)


@dataclass
class CompileStatus:
    """What the compiled path is doing (for /health, metrics and benchmarks)."""

    mode: str
    signatures: int = 0  # how many the engine can meet
    ready: int = 0  # loaded and used by the serving path
    compiled_steps: int = 0
    eager_steps: int = 0
    first_ready_s: float | None = None  # seconds from the engine's start to the first loaded step
    all_ready_s: float | None = None
    guard_misses: int = 0  # steps of a loaded signature its guards refused (run eager)
    error: str | None = None
    faults: dict[str, int] = field(default_factory=dict)  # compile-cache faults by CacheFault.kind
    load_s: list[float] = field(default_factory=list)  # seconds each swap-in held the scheduler


class DecodeSteps:
    """The engine's decode step, eager or compiled per :func:`step_signature` (see the module doc)."""

    def __init__(self, model: NestedGPT, mode: CompileMode = "off", *, max_batch: int = 32,
                 cache_dir: Path | None = None, checkpoint: Path | None = None,
                 rows: list[list[str]] | None = None) -> None:
        """``rows``: one row-width list per signature to compile (default :func:`representative_rows`;
        a benchmark of one width needs two). The worker of ``background`` compiles the default set."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
        if mode == "background" and checkpoint is None:
            raise ValueError("compile='background' needs the checkpoint path (the worker loads it)")
        self.model = model
        self.mode = mode
        self.started = time.monotonic()
        self.device = model.wte.weight.device
        self.rows = (rows or representative_rows(model.config, max_batch)) if mode != "off" else []
        self.status = CompileStatus(mode=mode, signatures=len(self.rows))
        self.on_report: Callable[[], None] | None = None  # the engine's wake-up, called from the reader thread
        self._steps: dict[tuple, Callable] = {}  # signature -> loaded compiled step
        self._warned: set[tuple] = set()
        self._reported: queue.SimpleQueue[int | str] = queue.SimpleQueue()
        self._worker: subprocess.Popen | None = None
        self._max_batch, self._checkpoint = max_batch, checkpoint
        self._started = False
        if mode == "off":
            return
        self.cache_dir = cache_dir_for(model.config, cache_dir or default_cache_dir())
        try:
            check_private(self.cache_dir)
        except OSError as exc:
            if mode == "require":
                raise
            # Background compilation is an optimisation: a read-only home or an unsafe cache
            # leaves the server eager, said once, rather than not serving.
            log.warning("compiled decode steps off: %s", exc)
            self.mode, self.rows, self.status = "off", [], CompileStatus(mode="off", error=str(exc))
            return
        if mode == "require":
            configure(self.cache_dir)
        else:  # the imports wait for start()'s thread: background mode adds nothing to start-up
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir / "inductor")
        self._lock = threading.Lock()
        self._stopping = False
        self._signatures = [rows_signature(model.config, rows) for rows in self.rows]
        self.paths = [artifact_path(self.cache_dir, signature, self.device, model.wte.weight.dtype)
                      for signature in self._signatures]
        if mode == "require":
            for index, rows in enumerate(self.rows):
                if not self.paths[index].exists() or self._faulty(index):
                    try:
                        compile_step(model, rows, self.paths[index])
                    except CacheFault as fault:  # a full disk: this signature runs eager
                        self.fault(fault)
                        continue
                self._load(index)

    def start(self) -> None:
        """Background mode: import the compiler's runtime and load the steps already in the cache now
        (a warm restart serves compiled from its first request: loading later, under load, would
        stall running sequences), then start a worker process for the rest on a thread."""
        if self.mode != "background" or self._started:
            return
        self._started = True
        import_compiler()
        missing = []
        for index, path in enumerate(self.paths):
            if not path.exists() or self._faulty(index):
                missing.append(index)  # absent, or a bad artifact: compiled again
                continue
            try:
                self._load(index)
            except Exception as exc:  # a step that will not load leaves that signature eager
                self.status.error = f"{type(exc).__name__}: {exc}"
                log.exception("loading compiled decode step %d failed; it stays eager", index)
        if missing:
            threading.Thread(target=self._background, args=(missing,), name="matta-compile", daemon=True).start()

    def _background(self, missing: list[int]) -> None:
        cmd = [*WORKER_COMMAND, "--checkpoint", str(self._checkpoint), "--max-batch", str(self._max_batch),
               "--threads", str(torch.get_num_threads()), "--cache-dir", str(self.cache_dir),
               "--device", str(self.device), "--dtype", str(self.model.wte.weight.dtype).removeprefix("torch."),
               "--only", ",".join(map(str, missing))]
        with self._lock:
            if self._stopping:
                return
            # Started from this thread, which waits for it (the parent-death signal follows the thread).
            self._worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            **spawn_options(nice=10))
        self._read_worker()

    def stop(self) -> None:
        """Stop the worker if it is still compiling (the steps it finished stay in the cache)."""
        if self.mode != "background":
            return
        with self._lock:
            self._stopping = True
        if self._worker is not None and self._worker.poll() is None:
            self._worker.terminate()
            try:
                self._worker.wait(5)
            except subprocess.TimeoutExpired:
                self._worker.kill()

    def _read_worker(self) -> None:
        for line in self._worker.stdout:
            try:
                report = json.loads(line)
                if "fault" in report:  # the worker could not save a step (a full disk): it stays eager
                    self.fault(CacheFault(report["fault"], Path(report["path"]), report["error"]))
                    continue
                self._report(int(report["index"]))
            except (ValueError, KeyError, TypeError):
                log.warning("compile worker: unreadable line %r", line[:200])
        code = self._worker.wait()
        if code != 0:
            err = self._worker.stderr.read()[-2000:]
            self._report(f"the compile worker exited with code {code}: {err.strip()}")

    def _report(self, item: int | str) -> None:
        self._reported.put(item)
        if self.on_report is not None:
            self.on_report()

    def pending(self) -> int:
        """How many reports (finished steps, worker errors) wait for :meth:`poll`."""
        return self._reported.qsize()

    @property
    def ready_signatures(self) -> Collection[tuple]:
        """The step signatures that run compiled now."""
        return self._steps.keys()

    def poll(self, limit: int | None = None) -> int:
        """Load the steps that are ready (call at an iteration boundary, on the engine's thread), at
        most ``limit`` of them (each holds the engine ~0.1-0.5 s: the scheduler decides how many);
        returns how many it loaded."""
        loaded = 0
        while limit is None or limit > 0:
            if limit is not None:
                limit -= 1
            try:
                item = self._reported.get_nowait()
            except queue.Empty:
                return loaded
            if isinstance(item, str):
                self.status.error = item
                log.warning("%s; steps without a compiled version stay eager", item)
                continue
            try:
                self._load(item)
                loaded += 1
            except Exception as exc:  # a step that will not load leaves that signature eager
                self.status.error = f"{type(exc).__name__}: {exc}"
                log.exception("loading compiled decode step %d failed; it stays eager", item)
        return loaded

    def fault(self, fault: CacheFault) -> None:
        """Count a compile-cache fault and say it once; the signature concerned runs eager."""
        self.status.faults[fault.kind] = self.status.faults.get(fault.kind, 0) + 1
        self.status.error = str(fault)
        log.warning("compile cache: %s; that decode step runs eager", fault)

    def _faulty(self, index: int) -> bool:
        fault = artifact_fault(self.paths[index])
        if fault is not None:
            self.fault(fault)
        return fault is not None

    def _load(self, index: int) -> None:
        started = time.perf_counter()
        try:
            step = load_step(self.paths[index])
        except CacheFault as fault:  # changed since it was checked (or a worker's): never handed to torch
            self.fault(fault)
            return
        step.disable_guard_check()  # __call__ checks them first, and runs eager when they refuse
        self.status.load_s.append(time.perf_counter() - started)
        self._steps[self._signatures[index]] = step
        self.status.ready = len(self._steps)
        now = time.monotonic() - self.started
        if self.status.first_ready_s is None:
            self.status.first_ready_s = now
        if self.status.ready == self.status.signatures:
            self.status.all_ready_s = now
        log.info("compiled decode step %d/%d loaded in %.2f s", self.status.ready, self.status.signatures,
                 self.status.load_s[-1])

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None, cache: StaticKVCache, plans: Plans) -> torch.Tensor:
        """One decode step (see :func:`decode_logits`), compiled when its signature's step is loaded
        and its guards accept these inputs, eager otherwise."""
        # Growing the buffers stays outside the graph, and so does a cache filled to its last slot:
        # the compiled steps were traced with room to spare (their guards say length + 1 < capacity).
        cache.reserve(min(cache.length + 2, self.model.config.n_ctx), self.model.config.n_ctx)
        plans = plans if isinstance(plans, list) else list(plans)  # compiled with a list; its guards check the type
        signature = step_signature(ids.shape[0], plans)
        step = self._steps.get(signature) if self._steps else None
        if step is not None:
            if step.guard_check(self.model, ids, mask, cache, plans):
                self.status.compiled_steps += 1
                return step(self.model, ids, mask, cache, plans)
            self.status.guard_misses += 1
            if signature not in self._warned:
                self._warned.add(signature)
                log.warning("a compiled decode step's guards refused a step of its signature (batch %d, cache %d/%d; "
                            "%s); such steps run eager", ids.shape[0], cache.length, cache.capacity,
                            _refusal(step, (self.model, ids, mask, cache, plans)))
        self.status.eager_steps += 1
        return decode_logits(self.model, ids, mask, cache, plans)


def _refusal(step, args: tuple) -> str:
    """Which guards refused ``args`` (for the log; torch's guard report, best effort)."""
    try:
        report = step._artifacts.guard_manager.check_verbose(step.prepare_f_locals(*args))
        return "; ".join(report.verbose_code_parts)[:500]
    except Exception as exc:  # a private torch API: the warning must not fail the step
        return f"no guard report ({type(exc).__name__})"
