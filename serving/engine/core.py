"""The engine: one loop, on one thread, over the scheduler, the model runner and the output processor.

:class:`EngineCore` is one iteration at a time, as vLLM V1's core: **schedule** (the scheduler
decides refusals, admissions with their widths, width changes of running sequences, prompt chunks
and swap-ins, :mod:`serving.engine.scheduler`) -> **run** (the model runner prefills and decodes,
:mod:`serving.worker.model_runner`: unchunked, the admitted prompts whole and then a decode step
over every row; with chunked prefill, a decode step over the rows whose prompts are done and then
the scheduler's chunks, so a long prompt never stalls them for more than a chunk) -> **update**
(tokens become text and finish reasons,
:mod:`serving.engine.output_processor`; the latency model learns what the step cost on the path
it ran) -> **send** (the caller ships the outputs and the one load view).

The engine-core process (:mod:`serving.engine.core_process`) runs that loop on its main thread between reads of
its socket; :class:`serving.engine.inproc.Engine` runs the same loop on a thread of the server process
(``--engine inproc``, tests), handing outputs to asyncio streams. Requests, outputs and the load view are the
message structs of :mod:`serving.messages` in both.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Sequence

from matta.model import NestedGPT
from matta.tokenizer import Tokenizer
from router.latency import BATCH_BUCKETS, LatencyModel
from serving import messages as msg
from serving.engine.output_processor import OutputProcessor
from serving.engine.scheduler import DEFAULT_MARGIN, QueueFullError, Scheduler, SeqState
from serving.worker.compiled import DecodeSteps
from serving.worker.model_runner import ModelRunner

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 4  # per calibration sequence: its prefill and three decode steps at the round's batch
CALIBRATION_PROMPT = 16  # tokens per calibration prompt (a chat turn's order, and one chunk)


class EngineCore:
    """Scheduler + model runner + output processor, driven one iteration at a time by one thread."""

    def __init__(self, model: NestedGPT, tokenizer: Tokenizer, *, max_batch: int = 32, max_queue: int = 256,
                 latency: LatencyModel | None = None, steps: DecodeSteps | None = None,
                 margin: float = DEFAULT_MARGIN, width_changes: bool = False, max_num_batched_tokens: int = 0) -> None:
        """``latency``, when given, prices every decision (admission, width, refusal, swap-in) and is
        told what every step cost; without it the engine admits first come, first served.
        ``width_changes``: running sequences may change width (``--width-changes``).
        ``max_num_batched_tokens``: chunked prefill's tokens per iteration, 0 for unchunked."""
        self.config = model.config
        self.runner = ModelRunner(model, steps)
        self.steps = self.runner.steps
        self.latency = latency
        sizes = {w: sum(self.config.resolve_width(w)) for w in self.config.served_widths}
        self.scheduler = Scheduler(self.config.served_widths, sizes, max_batch=max_batch, max_queue=max_queue,
                                   latency=latency, path_of=self.runner.path_of, margin=margin,
                                   width_changes=width_changes, token_budget=max_num_batched_tokens)
        self.output = OutputProcessor(tokenizer, self.config.eos_token_id, self.config.n_ctx)
        self._seqs: dict[int, SeqState] = {}
        self._prompts: dict[int, tuple[list[int], msg.Sampling]] = {}
        self._requests: dict[int, list[SeqState]] = {}
        self._busy_s = dict.fromkeys(msg.BUSY_PHASES, 0.0)
        self._iterations = self._overruns_2x = 0
        self._overrun_s = 0.0
        self._busy_since: float | None = None  # perf_counter() the last iteration ended, while the engine kept working

    # --- requests ----------------------------------------------------------------------------

    def validate(self, prompts: Sequence[Sequence[int]], widths: Sequence[str]) -> None:
        """ValueError for what the model cannot take (checked again here: the core trusts no one)."""
        for name in widths:
            if name not in self.scheduler.ffn_size:
                raise ValueError(f"unknown width {name!r}; known: {self.config.served_widths}")
        if not widths:
            raise ValueError("no width to serve the request at")
        for prompt in prompts:
            if not prompt:
                raise ValueError("prompt is empty")
            if len(prompt) > self.config.n_ctx:
                raise ValueError(f"prompt has {len(prompt)} tokens; the context window is {self.config.n_ctx}")
            bad = next((t for t in prompt if not 0 <= t < self.config.vocab_size), None)
            if bad is not None:
                raise ValueError(f"token id {bad} is outside the vocabulary 0..{self.config.vocab_size - 1}")

    def add(self, request: msg.Add) -> list[msg.SequenceOutput]:
        """Queue a request's prompts; what refuses it at once (a full queue, bad input) comes back as
        final outputs ("queue_full", "abort")."""
        now = time.monotonic()
        arrival = request.arrival or now
        n_ctx = self.config.n_ctx
        budgets = [max(0, min(request.sampling.max_tokens, n_ctx - len(p))) for p in request.prompts]
        try:
            self.validate(request.prompts, request.widths)
            seqs = self.scheduler.add(request.request_id, [len(p) for p in request.prompts], budgets,
                                      request.widths, request.slo, arrival, request.width_changes)
        except (QueueFullError, ValueError) as exc:
            reason = "queue_full" if isinstance(exc, QueueFullError) else "abort"
            log.info("request %d refused: %s", request.request_id, exc)
            return [msg.SequenceOutput(request.request_id, i, [], "", now, finish_reason=reason,
                                       prompt_tokens=len(p)) for i, p in enumerate(request.prompts)]
        for seq, prompt in zip(seqs, request.prompts, strict=True):
            self._seqs[seq.seq_id] = seq
            self._prompts[seq.seq_id] = (list(prompt), request.sampling)
            self.output.add(seq.seq_id, request.request_id, seq.index, len(prompt), request.sampling, request.stream)
        self._requests[request.request_id] = seqs
        return []

    def cancel(self, request_id: int) -> None:
        """Free a request's sequences now (between iterations: waiting or running)."""
        for seq in self._requests.pop(request_id, []):
            if seq.seq_id in self._seqs:
                self._forget(seq, cancelled=True)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self.steps.pending())

    def _forget(self, seq: SeqState, cancelled: bool = False) -> None:
        if seq.running:
            self.runner.remove({seq.seq_id})
        self.scheduler.remove(seq, cancelled=cancelled)
        self._seqs.pop(seq.seq_id, None)
        self._prompts.pop(seq.seq_id, None)
        self.output.finish(seq.seq_id, "abort", 0.0)  # drops its text state; nobody hears of it
        requests = self._requests.get(seq.request_id)
        if requests is not None and all(s.seq_id not in self._seqs for s in requests):
            self._requests.pop(seq.request_id, None)

    # --- start-up calibration ----------------------------------------------------------------------

    def calibrate(self) -> float:
        """Before serving: run every batch-size bucket of the latency model through this loop, at each
        width alone and at all widths mixed, on the path each step will run; returns the seconds it took.

        Why: online, the model learns a bucket only when traffic reaches it, and a bucket not yet seen
        borrows another's factor. A burst's first batch of 15 rows was priced on what solo requests had
        measured, ran at twice that, and every answer admitted on it was late; the same batch in
        another process ran 1.6-2.6x faster (docs/benchmarks.md, "Late bursts"). What a process's
        steps cost is a property of the process, so it is measured in it before the first request.
        The rounds go through :meth:`step` (schedule, prefill, decode, output processing), so what is
        learnt is what serving costs; their steps count in the decode-step counters, not as iterations,
        overruns or finished requests."""
        if self.latency is None:
            return 0.0
        started = time.perf_counter()
        widths = self.config.served_widths
        sizes = sorted({min(self.scheduler.max_batch, (2 << b) - 1 if b < BATCH_BUCKETS - 1 else 1 << 30)
                        for b in range(BATCH_BUCKETS)})
        prompt = [t % self.config.vocab_size for t in range(1, CALIBRATION_PROMPT + 1)]
        ids = itertools.count(-1, -1)  # never a client's request id
        counters = self._iterations, self._overrun_s, self._overruns_2x, self.scheduler.finished
        load_ceiling = copy.deepcopy(self.scheduler.load_ceiling)  # its rows are no clients' arrivals
        budget = self.scheduler.token_budget
        for rows in sizes:
            # Chunked, the prompts of a round take several iterations: the first rows decode on until
            # the last is in, so the round still runs steps over all of its rows.
            filling = math.ceil(rows * CALIBRATION_PROMPT / max(1, budget - rows)) if budget else 0
            sampling = msg.Sampling(max_tokens=CALIBRATION_TOKENS + filling, temperature=0.0)
            for mix in [[w] for w in widths] + [widths]:
                for i in range(rows):  # one request per row, as clients send them
                    self.add(msg.Add(next(ids), [prompt], (mix[i % len(mix)],), sampling, msg.NO_SLO,
                                     time.monotonic(), stream=False))
                while self.scheduler.waiting or self.scheduler.running:
                    self.step()
        self._iterations, self._overrun_s, self._overruns_2x, self.scheduler.finished = counters
        self.scheduler.load_ceiling = load_ceiling
        self._busy_since = None
        seconds = time.perf_counter() - started
        log.info("calibrated the latency model on %s rows in %.2f s: %s", sizes, seconds, self.latency.corrections())
        return seconds

    # --- one iteration ---------------------------------------------------------------------------

    def step(self) -> list[msg.SequenceOutput]:
        """Schedule -> run -> update once; returns every output of the iteration."""
        started = time.perf_counter()
        # What a token costs is the whole loop around a decode step (scheduling, reading requests,
        # sending outputs), not the forward alone: priced apart, that overhead made admitted
        # requests 40% later than predicted under a burst. So the step is timed from the end of the
        # previous iteration when the engine went straight on.
        begun = self._busy_since if self._busy_since is not None else started
        now = time.monotonic()
        plan = self.scheduler.schedule(now, swaps_pending=self.steps.pending())
        outputs = [self.output.finish(s.seq_id, "shed", now) for s in plan.shed]
        for seq in plan.shed:
            self._forget(seq)
        if plan.changes:  # the rows continue at their new widths on the caches they have
            self.runner.set_widths({seq.seq_id: new for seq, _, new in plan.changes})
        swap_s = 0.0
        if plan.swap_in:
            swapping = time.perf_counter()
            loaded = self.steps.poll(limit=plan.swap_in)
            swap_s = time.perf_counter() - swapping
            self._busy_s["swap_in"] += swap_s
            if loaded:
                self.runner.forget_paths()
                self.scheduler.observe_swap(swap_s / loaded)
        try:
            prefilling = time.perf_counter()
            if plan.admitted and not self.scheduler.chunked:
                outputs += self._prefill(plan.admitted)
            decoding = time.perf_counter()
            decoded = self._decode(outputs)
            done = time.perf_counter()
            prefill_s, decode_s = decoding - prefilling, done - decoding
            if plan.chunks:
                # Chunked: after the decode step, whose budget counted one token per row decoding now;
                # a row whose last chunk runs now decodes from the next iteration.
                chunking = done
                outputs += self._run_chunks(plan.chunks)
                done = time.perf_counter()
                prefill_s += done - chunking
        except Exception:  # a bug or out-of-memory: fail the affected requests, keep serving
            log.exception("engine step failed; aborting the running sequences")
            self._busy_since = None
            return [o for o in outputs if o is not None] + self.abort_all(running_only=True)
        self._busy_s["prefill"] += prefill_s
        self._busy_s["decode"] += decode_s
        if decoded is not None and self.latency is not None:
            shapes, path = decoded
            self.latency.observe_step(shapes, path, (done - begun) - swap_s - prefill_s)
        elapsed = done - started
        if plan.predicted_s > 0:
            self._iterations += 1
            self._overrun_s += max(0.0, elapsed - plan.predicted_s)
            self._overruns_2x += elapsed > 2 * plan.predicted_s
        self._busy_since = done if self.scheduler.running else None
        return [o for o in outputs if o is not None]

    def _prefill(self, admitted: list[SeqState]) -> list[msg.SequenceOutput]:
        work = [(s.seq_id, self._prompts[s.seq_id][0], s.width, self._prompts[s.seq_id][1]) for s in admitted]
        sampled, timings = self.runner.prefill(work)
        if self.latency is not None:
            for width, (tokens, seconds) in timings.items():
                self.latency.observe_prefill(width, tokens, seconds)
        return self._update(admitted, sampled, first=True)

    def _run_chunks(self, chunks: list[tuple[SeqState, int, int]]) -> list[msg.SequenceOutput]:
        """The scheduler's prompt chunks; a sequence whose last chunk ran has its first token."""
        work = [(s.seq_id, *self._prompts[s.seq_id][:1], s.width, self._prompts[s.seq_id][1], start, tokens)
                for s, start, tokens in chunks]
        sampled, timings = self.runner.prefill_chunks(work)
        if self.latency is not None:
            for width, tokens, context, seconds in timings:
                self.latency.observe_prefill(width, tokens, seconds, context)
        return self._update([s for s, _, _ in chunks if s.seq_id in sampled], sampled, first=True)

    def _decode(self, outputs: list[msg.SequenceOutput]) -> tuple[dict, str] | None:
        """One decode step over the model runner's rows (not a row still prefilling); appends its
        outputs; returns the step's (shapes, path), None when idle."""
        running = [self._seqs[seq_id] for seq_id in self.runner.row_ids]
        if not running:
            return None
        shapes = self.scheduler.shapes(running, midpoint=False)
        path = self.runner.path_of([s.width for s in running])
        outputs += self._update(running, self.runner.decode())
        return shapes, path

    def _update(self, seqs: list[SeqState], sampled: dict, first: bool = False) -> list[msg.SequenceOutput]:
        """Each sequence's new token becomes its output; finished sequences leave the batch."""
        now = time.monotonic()
        outputs, done = [], []
        for seq in seqs:
            result = sampled[seq.seq_id]
            queue_s = seq.admitted_at - seq.arrival
            if result.token < 0:  # max_tokens 0: the prompt scored, nothing generated
                out = self.output.finish(seq.seq_id, "length", now, seq.width, result.prompt_logprobs, queue_s)
            else:
                out = self.output.token(seq.seq_id, result.token, result.logprob, now, seq.width,
                                        result.prompt_logprobs, seq.predicted_s if first else None, queue_s,
                                        seq.steps)
                self.scheduler.update(seq, 1, now)
            if out is None:  # kept for the sequence's last output (not streamed)
                continue
            outputs.append(out)
            if out.finish_reason is not None:
                done.append(seq)
        for seq in done:
            self._forget(seq)
        return outputs

    def abort_all(self, running_only: bool = False) -> list[msg.SequenceOutput]:
        """End sequences the engine cannot finish (stopping, or a failed step), telling their clients."""
        now = time.monotonic()
        seqs = list(self.scheduler.running) + ([] if running_only else list(self.scheduler.waiting))
        outputs = [self.output.finish(s.seq_id, "abort", now, s.width, steps=s.steps) for s in seqs]
        self.runner.clear()
        for seq in seqs:
            seq.running = False
            self._forget(seq)
        return [o for o in outputs if o is not None]

    def load(self) -> msg.Load:
        """The one load view: the scheduler's queues and batch, the runner's and the iterations' counters."""
        status = self.steps.status
        return self.scheduler.load(
            steps=self.runner.decode_steps, corrections=self.latency.corrections() if self.latency else {},
            compiled_steps=status.compiled_steps, eager_steps=status.eager_steps, compile_ready=status.ready,
            compile_signatures=status.signatures, busy_s=dict(self._busy_s), iterations=self._iterations,
            overrun_s=self._overrun_s, overruns_2x=self._overruns_2x,
            compile_faults=dict(status.faults), prefill_chunks=self.runner.chunks_run)
