"""The serving engine: one copy of the weights, every width, continuous batching on a background thread.

Requests enter a bounded FIFO queue. A scheduler thread loops: admit waiting sequences into
free slots and prefill them (one left-padded batch per width), then run one decode step for
every running sequence, whatever its width, in one forward (attention, norms, embeddings and the
LM head shared; each FFN block of hidden units only for the rows whose width includes it, rows
kept widest first so a block runs on a prefix), sample, emit, and drop finished or cancelled
rows. Sequences therefore join and leave between decode steps. (``mixed=False`` keeps the older
one-forward-per-width-group step, for side-by-side benchmarks.)

KV cache layout: the running group keeps one left-padded, preallocated cache
(:class:`~matta.model.StaticKVCache`, per layer (B, n_head, capacity, head_dim), filled to L)
with an attention mask (B, L) marking real tokens. ``NestedGPT.forward`` derives positions from
the mask, so a padded row computes exactly what it would alone. A decode step writes its keys
and values in place and attends to views: no step copies the cache (a concatenating cache
copied B * L * d per layer and step, which on this small model cost more than the FFN and hid
most of the Student's speed-up). The per-step Python work is O(rows), independent of sequence
length (sampling, and incremental UTF-8 decoding of the newest token only). Joins pad +
concatenate once; leaves gather the surviving rows once and trim columns that became padding in
every row, so L stays the longest live sequence; both rebuild the buffers, once per event.

The asyncio side talks to the thread through :meth:`Engine.submit` (returns a
:class:`RequestStream`, an async iterator of events) and :meth:`RequestStream.cancel`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from matta.model import NestedGPT, StaticKVCache, ffn_plans
from matta.tokenizer import Tokenizer
from router.cost import EngineCostModel
from serving.compiled import DecodeSteps
from serving.detokenize import IncrementalDetokenizer

log = logging.getLogger(__name__)

class QueueFullError(RuntimeError):
    """The waiting queue cannot take the request now; retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineStoppedError(RuntimeError):
    """The engine is stopping or stopped and takes no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated. ``temperature == 0`` (or below ``GREEDY_BELOW``) is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per token; None: no logprobs at all
    prompt_logprobs: bool = False  # also score the prompt tokens (echo + logprobs)
    # time.monotonic() by which the sequence must finish. One still waiting for a batch slot that
    # can no longer make it (by the latency model, when the engine has one) is never started: it
    # ends with finish_reason "shed", so its client hears at once instead of being served late.
    deadline: float | None = None
    # Width chosen at dispatch: when ``widths`` (narrowest first) is given, the engine picks among
    # them when the sequence gets its batch slot, the widest that still finishes by
    # ``slo_deadline`` without making the running sequences late; waiting sequences with an
    # ``slo_deadline`` are served earliest deadline first.
    widths: tuple[str, ...] = ()
    slo_deadline: float | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one token under the model at the served width, and the best alternatives."""

    token_id: int
    logprob: float | None  # None for the first prompt token: nothing precedes it
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class SequenceEvent:
    """What one scheduler step produced for one sequence.

    ``text`` is new completion text; text that could still become part of a stop string is
    held back until it cannot. The last event of a sequence has ``finish_reason`` set
    ("stop", "length", "abort" when the engine stopped or failed, or "shed" when it could not
    start the sequence in time for its deadline) and the totals.
    """

    token_ids: list[int]
    text: str
    time: float  # time.monotonic() when the step finished
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # first event only
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0  # submit -> prefill start
    width: str | None = None  # the width the sequence is served at (chosen at dispatch, when it was)


BUSY_PHASES = ("prefill", "decode", "swap_in")  # where the scheduler's time goes (EngineStats.busy_s)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for the width policy, /metrics and tests."""

    running: int
    waiting: int
    running_by_width: dict[str, int]
    waiting_by_width: dict[str, int]
    max_batch: int
    max_queue: int
    steps: int  # decode forwards since start (one per step; one per width group with mixed=False)
    finished: int
    cancelled: int
    groups: dict[str, tuple[int, int]] = field(default_factory=dict)  # width -> (rows, cache length)
    remaining_tokens: tuple[int, ...] = ()  # tokens each running sequence may still generate, ascending
    recent_iteration_s: float = 0.0  # measured seconds of recent scheduler iterations (EWMA; 0 when idle)
    compiled_steps: int = 0  # decode forwards run by a compiled graph (serving/compiled.py)
    eager_steps: int = 0
    compile_ready: int = 0  # step signatures with a compiled graph loaded
    compile_signatures: int = 0  # step signatures the engine can meet (0: compilation off)
    busy_s: dict[str, float] = field(default_factory=dict)  # scheduler seconds per phase: prefill, decode, swap-in
    compile_faults: dict[str, int] = field(default_factory=dict)  # compile-cache faults by kind (serving/compiled.py)


@dataclass(eq=False)
class _Sequence:
    """One prompt being generated; touched by the scheduler thread only, except ``cancelled``."""

    seq_id: int
    prompt: list[int]
    width: str
    params: SamplingParams
    emit: Callable[[SequenceEvent], None]
    arrival: float
    generator: torch.Generator | None = None
    detok: IncrementalDetokenizer | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already emitted
    queue_s: float = 0.0
    cancelled: bool = False
    running: bool = False  # holds a batch slot
    finished: bool = False  # its final event is out (or nobody listens any more)


@dataclass(eq=False)
class _Group:
    """The running sequences of one width, batched: row i of every tensor is ``seqs[i]``."""

    width: str
    seqs: list[_Sequence]
    cache: StaticKVCache  # per layer (B, nh, capacity, hs), left-padded, filled to L = mask.shape[1]
    mask: torch.Tensor  # (B, L) long, 1 = real token
    next_ids: torch.Tensor  # (B, 1) the last sampled token of each row, not yet in the cache


class RequestStream:
    """Events of one request's sequences for an asyncio consumer: ``async for index, event in stream``.

    Iteration ends after every sequence's final event. :meth:`cancel` (idempotent) frees the
    request's slots at the next step boundary.
    """

    def __init__(self, sequences: int, cancel: Callable[[], None], on_done: Callable[[], None] | None = None) -> None:
        """``cancel`` frees the request's sequences wherever they run; ``on_done`` runs after the last
        final event is read. Events are put into ``queue`` as (index, :class:`SequenceEvent`)."""
        self.queue: asyncio.Queue = asyncio.Queue()
        self._open = sequences
        self._cancel, self._on_done = cancel, on_done

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, SequenceEvent]:
        if self._open == 0:
            raise StopAsyncIteration
        index, event = await self.queue.get()
        if event.finish_reason is not None:
            self._open -= 1
            if self._open == 0 and self._on_done is not None:
                self._on_done()
        return index, event

    @property
    def done(self) -> bool:
        return self._open == 0

    def cancel(self) -> None:
        self._cancel()


class Engine:
    """Continuous-batching generation over one :class:`NestedGPT`, at any of its named widths."""

    def __init__(self, model: NestedGPT, tokenizer: Tokenizer, *, max_batch: int = 32, max_queue: int = 256,
                 cost: EngineCostModel | None = None, mixed: bool = True,
                 steps: DecodeSteps | None = None) -> None:
        """``cost``, when given, is the server's one cost model: its latency model is told the
        duration of every prefill, decode step and scheduler iteration, so its online corrections
        track this machine (see :mod:`router.latency`), and it prices the queue-shedding check.

        ``mixed`` (the default) decodes every running sequence in one forward whatever its width
        (:meth:`NestedGPT.forward` with ``row_widths``); ``False`` runs one forward per width
        group, as the engine did before (kept for side-by-side benchmarks).

        ``steps`` runs the decode forwards: eager (the default) or compiled per step signature as
        graphs become ready (:mod:`serving.compiled`; the engine starts and stops its worker)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self.mixed = mixed
        self._ffn_size = {w: sum(self.config.resolve_width(w)) for w in self.config.served_widths}
        # Running rows by key: one group for every width (MIXED) or one per width.
        self._groups: dict[str, _Group] = {}
        self._running_by_width = dict.fromkeys(self.config.served_widths, 0)
        self._waiting_by_width = dict.fromkeys(self.config.served_widths, 0)
        self._ids = itertools.count()
        self._steps = self._finished = self._cancelled = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.cost = cost
        self.latency = cost.model if cost is not None else None
        # Seconds of the recent decode steps (EWMA): what a sequence started now will really pay
        # per token, contention and width mix included, which the model alone misses.
        self._iteration_s = 0.0
        self._busy_s = dict.fromkeys(BUSY_PHASES, 0.0)
        # Written by the scheduler thread after every iteration (a reference swap), read by stats().
        self._shapes: dict[str, tuple[int, int]] = {}
        self._remaining: tuple[int, ...] = ()
        # Called on the scheduler thread after every iteration, once its events are out: the
        # engine-core process sends one message per step from here (serving/core.py).
        self.on_step: Callable[[], None] | None = None
        self.steps = steps if steps is not None else DecodeSteps(model)
        self.steps.on_report = self._wake

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="matta-engine", daemon=True)
            self._thread.start()
            self.steps.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking requests, abort what is left, and join the scheduler thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.steps.stop()

    def _wake(self) -> None:
        """Wake the scheduler (a compiled graph is ready to load)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def accepting(self) -> bool:
        return not self._stopping

    # --- requests ----------------------------------------------------------------------------

    def submit(self, prompts: Sequence[Sequence[int]], width: str, params: SamplingParams) -> RequestStream:
        """Queue one sequence per prompt, all or none; call from the asyncio loop that will consume them.

        Raises ValueError for a prompt the model cannot take, :class:`QueueFullError` when the
        queue has no room for all prompts, :class:`EngineStoppedError` when stopping.
        """
        loop = asyncio.get_running_loop()
        seqs: list[_Sequence] = []
        stream = RequestStream(len(prompts), lambda: self.cancel(seqs))
        seqs += self.add(prompts, width, params, lambda index: _threadsafe_emit(loop, stream.queue, index))
        return stream

    def add(self, prompts: Sequence[Sequence[int]], width: str, params: SamplingParams,
            emitter: Callable[[int], Callable[[SequenceEvent], None]]) -> list[_Sequence]:
        """Queue one sequence per prompt, all or none; ``emitter(index)`` is the callback that
        receives prompt ``index``'s events (on the scheduler thread). Errors as :meth:`submit`."""
        for name in (width, *params.widths):
            if name not in self._running_by_width:
                raise ValueError(f"unknown width {name!r}; known: {self.config.served_widths}")
        for prompt in prompts:
            if not prompt:
                raise ValueError("prompt is empty")
            if len(prompt) > self.config.n_ctx:
                raise ValueError(f"prompt has {len(prompt)} tokens; the context window is {self.config.n_ctx}")
        now = time.monotonic()
        seqs = [
            _Sequence(seq_id=next(self._ids), prompt=list(p), width=width, params=params, arrival=now,
                      emit=emitter(index))
            for index, p in enumerate(prompts)
        ]
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFullError(
                    f"the queue is full ({len(self._waiting)} waiting, limit {self.max_queue}); retry later"
                )
            self._waiting.extend(seqs)
            self._waiting_by_width[width] += len(seqs)
            self._cond.notify_all()
        return seqs

    def cancel(self, seqs: Sequence[_Sequence]) -> None:
        """Cancel sequences: waiting ones leave the queue now, running ones at the next step boundary."""
        with self._cond:
            for seq in seqs:
                if seq.finished or seq.cancelled:
                    continue
                seq.cancelled = True
                self._cancelled += 1
                if seq in self._waiting:
                    self._waiting.remove(seq)
                    self._waiting_by_width[seq.width] -= 1
                    seq.finished = True
            self._cond.notify_all()

    def stats(self) -> EngineStats:
        """A consistent snapshot of the load (cheap; called per request and per scrape)."""
        compiled = self.steps.status
        with self._cond:
            return EngineStats(
                running=sum(self._running_by_width.values()),
                waiting=len(self._waiting),
                running_by_width=dict(self._running_by_width),
                waiting_by_width=dict(self._waiting_by_width),
                max_batch=self.max_batch,
                max_queue=self.max_queue,
                steps=self._steps,
                finished=self._finished,
                cancelled=self._cancelled,
                groups=self._shapes,
                remaining_tokens=self._remaining,
                recent_iteration_s=self._iteration_s,
                compiled_steps=compiled.compiled_steps,
                eager_steps=compiled.eager_steps,
                compile_ready=compiled.ready,
                compile_signatures=compiled.signatures,
                busy_s=dict(self._busy_s),
                compile_faults=dict(compiled.faults),
            )

    # --- scheduler thread ----------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while (not self._stopping and not self._waiting and not self._groups
                           and not self.steps.pending()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    late = self._take_late_locked(time.monotonic())
                    admitted = self._admit_locked()
                for seq in late:
                    self._release(seq)
                    self._finish_event(seq, [], None, "shed")
                try:
                    started = time.perf_counter()
                    self._drop_cancelled()
                    self._prefill(admitted)
                    decoding = time.perf_counter()
                    predicted = self._decode()
                    done = time.perf_counter()
                    self._busy_s["prefill"] += decoding - started
                    self._busy_s["decode"] += done - decoding
                    if self.latency is not None and predicted > 0:
                        self.latency.observe_iteration(done - started, predicted)
                        # What a token costs now is the decode step: a burst's prefills are a one-off,
                        # and counting them made every waiting request look late (and shed).
                        self._iteration_s += 0.3 * (done - decoding - self._iteration_s)
                    if not self._groups:
                        self._iteration_s = 0.0  # idle: a stale busy figure must not refuse the next arrival
                except Exception:  # a bug or out-of-memory: fail the affected requests, keep serving
                    log.exception("engine step failed; aborting the running sequences")
                    self._abort(self._all_running() + admitted)
                # Swap compiled steps in between iterations, never during one; one per iteration while busy.
                swapping = time.perf_counter()
                self.steps.poll(limit=1 if self._groups or self._waiting else None)
                self._busy_s["swap_in"] += time.perf_counter() - swapping
                self._publish_shapes()
                if self.on_step is not None:
                    self.on_step()
        with self._cond:
            leftover = list(self._waiting)
            self._waiting.clear()
            self._waiting_by_width = dict.fromkeys(self._waiting_by_width, 0)
        self._abort(leftover + self._all_running())

    def _publish_shapes(self) -> None:
        self._shapes = {w: (n, int(g.mask.shape[1])) for g in self._groups.values()
                        for w, n in self._rows_by_width(g.seqs).items()}
        self._remaining = tuple(sorted(self._generable(s) for g in self._groups.values() for s in g.seqs))

    def _take_late_locked(self, now: float) -> list[_Sequence]:
        """Remove the waiting sequences that cannot finish by their deadline even if started now."""
        if not any(seq.params.deadline is not None for seq in self._waiting):
            return []
        late, keep = [], deque()
        for seq in self._waiting:
            if seq.params.deadline is not None and now + self._service_s(seq) > seq.params.deadline:
                late.append(seq)
                self._waiting_by_width[seq.width] -= 1
            else:
                keep.append(seq)
        self._waiting = keep
        return late

    def _service_s(self, seq: _Sequence) -> float:
        """Predicted seconds from starting ``seq`` now to its last token: its prefill, then each
        token at the slower of the model's iteration time for the batch it joins and the measured
        time of recent decode steps (0 without a latency model: then only a passed deadline counts)."""
        if self.cost is None:
            return 0.0
        width = seq.params.widths[0] if seq.params.widths else seq.width  # at dispatch it may go narrowest
        return self.cost.service_s(width, 1, len(seq.prompt), self._generable(seq), self._shapes, self._iteration_s)

    def _generable(self, seq: _Sequence) -> int:
        """Tokens ``seq`` may still generate: ``max_tokens`` as far as the context window lets it go
        (what every prediction prices: max_tokens 10**12 is not 10**12 steps)."""
        return max(0, min(seq.params.max_tokens, self.config.n_ctx - len(seq.prompt)) - len(seq.tokens))

    def _admit_locked(self) -> list[_Sequence]:
        free = self.max_batch - sum(self._running_by_width.values())
        admitted = []
        while self._waiting and free > 0:
            seq = self._next_waiting_locked()
            self._waiting_by_width[seq.width] -= 1
            admitted.append(seq)
            free -= 1
        if self.cost is not None and any(seq.params.widths for seq in admitted):
            self._dispatch_widths(admitted, time.monotonic())
        for seq in admitted:
            self._running_by_width[seq.width] += 1
            seq.running = True
        return admitted

    def _next_waiting_locked(self) -> _Sequence:
        """Earliest SLO deadline first (sequences without one after them, in arrival order)."""
        if not any(seq.params.slo_deadline is not None for seq in self._waiting):
            return self._waiting.popleft()
        seq = min(self._waiting, key=lambda s: (s.params.slo_deadline is None, s.params.slo_deadline or 0.0, s.seq_id))
        self._waiting.remove(seq)
        return seq

    def _dispatch_widths(self, admitted: list[_Sequence], now: float) -> None:
        """SlackFit at dispatch: spend the slack of the batch on width.

        Every sequence admitted now with a choice of widths starts at its narrowest; then, earliest
        deadline first, each is widened one step at a time while every deadline stays met: the
        running sequences' and the admitted ones' (prefill, then their remaining tokens at the
        joined batch's iteration time, with the batch's free slots filled by narrowest rows), and
        the next waiting ones' (each starts when a running row ends, then runs at its narrowest
        width). When some deadline is missed even with everything at the narrowest, the server is
        overloaded and nothing is widened: the queue drains fastest at the narrowest widths.
        """
        latency = self.cost.model
        running = [s for g in self._groups.values() for s in g.seqs]
        free = self.max_batch - len(running) - len(admitted)
        waiting = sorted((s for s in self._waiting if _target(s) < float("inf")),
                         key=lambda s: (_target(s), s.seq_id))[: self.max_batch]
        choosing = [s for s in admitted if s.params.widths]
        for seq in choosing:
            seq.width = seq.params.widths[0]
        narrowest = min((s.params.widths[0] for s in choosing), key=lambda w: self._ffn_size[w])
        # The batch may fill up while these run: a width is only spent if every deadline still holds
        # with the free slots taken by narrowest rows. A burst reaches the engine a few requests per
        # step, and no estimate of the arrival rate sees it coming: the first requests of a burst
        # widened on an empty batch made the whole batch slow, and the rest of the burst was refused
        # (48 at once, SLO 4x the Student's solo latency: 9 served at the TA, 34 refused).
        expected = max(0, free)

        def misses() -> set[int]:
            shapes: dict[str, tuple[int, int]] = {}
            for s in running + admitted:
                rows, context = shapes.get(s.width, (0, 0))
                shapes[s.width] = (rows + 1, max(context, len(s.prompt) + len(s.tokens) + self._generable(s) // 2))
            per_token = latency.iteration_s(shapes)  # corrected by what iterations measure (its factor)
            if expected:  # rows that will arrive while these run, at the narrowest width
                rows, context = shapes.get(narrowest, (0, 0))
                shapes[narrowest] = (rows + expected, max(context, 1))
                per_token = latency.iteration_s(shapes)
            missed, ends = set(), []
            for s in running + admitted:
                prefill = latency.prefill_s(s.width, len(s.prompt)) if not s.running else 0.0
                end = now + prefill + max(0, self._generable(s) - 1) * per_token
                ends.append(end)
                if end > _target(s):
                    missed.add(s.seq_id)
            for start, s in zip(sorted(ends), waiting, strict=False):
                narrow = s.params.widths[0] if s.params.widths else s.width
                if start + self.cost.service_s(narrow, 1, len(s.prompt), self._generable(s), shapes) > _target(s):
                    missed.add(s.seq_id)
            return missed

        if misses():
            return  # overload: some deadline is missed even at the narrowest widths; drain as fast as it can go
        for seq in sorted(choosing, key=lambda s: (s.params.slo_deadline or float("inf"), s.seq_id)):
            for wider in seq.params.widths[1:]:
                narrower, seq.width = seq.width, wider
                if misses():
                    seq.width = narrower
                    break

    def _release(self, seq: _Sequence) -> None:
        """Free the sequence's batch slot (idempotent)."""
        with self._cond:
            if seq.running:
                seq.running = False
                self._running_by_width[seq.width] -= 1
                if not seq.cancelled:
                    self._finished += 1
            seq.finished = True

    def _abort(self, seqs: list[_Sequence]) -> None:
        """End sequences the engine cannot finish, telling their consumers so."""
        for seq in seqs:
            notify = not seq.finished and not seq.cancelled
            self._release(seq)
            if notify:
                self._finish_event(seq, [], None, "abort")
        self._groups.clear()

    def _all_running(self) -> list[_Sequence]:
        return [s for g in self._groups.values() for s in g.seqs]

    def _drop_cancelled(self) -> None:
        for group in list(self._groups.values()):
            keep = [i for i, s in enumerate(group.seqs) if not s.cancelled]
            if len(keep) < len(group.seqs):
                for s in group.seqs:
                    if s.cancelled:
                        self._release(s)
                self._keep_rows(group, keep)

    def _prefill(self, admitted: list[_Sequence]) -> None:
        """Run the prompts of newly admitted sequences (one left-padded batch per width); sample token 1."""
        by_width: dict[str, list[_Sequence]] = {}
        now = time.monotonic()
        for seq in admitted:
            if seq.cancelled:
                self._release(seq)
                continue
            seq.queue_s = now - seq.arrival
            seq.detok = IncrementalDetokenizer(self.tokenizer)
            if seq.params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
            if seq.params.max_tokens == 0 and not seq.params.prompt_logprobs:
                self._release(seq)
                self._finish_event(seq, [], None, "length")
                continue
            by_width.setdefault(seq.width, []).append(seq)
        for width, seqs in by_width.items():
            lengths = [len(s.prompt) for s in seqs]
            P = max(lengths)
            ids = torch.zeros(len(seqs), P, dtype=torch.long)
            mask = torch.zeros(len(seqs), P, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, P - len(s.prompt):] = torch.tensor(s.prompt)
                mask[i, P - len(s.prompt):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            started = time.perf_counter()
            # Logits at every prompt position only when a sequence asks for its prompt's logprobs;
            # otherwise the LM head runs for the last position alone (logits (B, 1, V)).
            keep = 0 if any(s.params.prompt_logprobs for s in seqs) else 1
            out = self.model(ids, width=width, attention_mask=mask, use_cache=True, logits_to_keep=keep)
            prompt_lp = [self._prompt_logprobs(out.logits[i, P - n:], s) if s.params.prompt_logprobs else None
                         for i, (s, n) in enumerate(zip(seqs, lengths, strict=True))]
            rows = [i for i, s in enumerate(seqs) if s.params.max_tokens > 0]
            for i, s in enumerate(seqs):
                if s.params.max_tokens == 0:
                    self._release(s)
                    self._finish_event(s, [], None, "length", prompt_logprobs=prompt_lp[i])
            if not rows:
                continue
            index = torch.tensor(rows, device=self.device)
            live = [seqs[i] for i in rows]
            next_ids = self._sample_and_emit(live, out.logits.index_select(0, index)[:, -1],
                                             [prompt_lp[i] for i in rows])
            if self.latency is not None:
                self.latency.observe_prefill(width, ids.numel(), time.perf_counter() - started)
            cache = StaticKVCache.from_list(
                [(k.index_select(0, index), v.index_select(0, index)) for k, v in out.past_key_values],
                capacity=self._capacity(P, live))
            group = _Group(width, live, cache, mask.index_select(0, index), next_ids)
            self._drop_finished(group, registered=False)
            if group.seqs:
                self._merge(group)

    def _decode(self) -> float:
        """One decode step per group (one for all widths when mixed): feed each row's last token,
        sample the next. Returns the latency model's prediction for these steps (0 without a model).
        """
        predicted = 0.0
        for width, group in list(self._groups.items()):
            B = len(group.seqs)
            started = time.perf_counter()
            mask = torch.cat([group.mask, torch.ones(B, 1, dtype=torch.long, device=self.device)], dim=1)
            if width == MIXED:
                plans = ffn_plans(self.config, [s.width for s in group.seqs], self.device)
            else:
                plans = self.config.resolve_width(width)
            logits = self.steps(group.next_ids, mask, group.cache, plans)  # extends group.cache in place
            group.mask = mask
            group.next_ids = self._sample_and_emit(group.seqs, logits, None)
            if self.latency is not None:
                context = int(mask.shape[1])
                rows = self._rows_by_width(group.seqs)
                predicted += self.latency.step_s({w: (n, context) for w, n in rows.items()})
                if len(rows) == 1:  # a one-width step corrects that width's profile
                    (only,) = rows
                    self.latency.observe_decode(only, B, context, time.perf_counter() - started)
            with self._cond:
                self._steps += 1
            self._drop_finished(group)
        return predicted

    # --- sampling and bookkeeping ------------------------------------------------------------

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor,
                         prompt_lp: list[list[TokenLogprob] | None] | None) -> torch.Tensor:
        """Sample one token per row of ``logits`` (B, V) for ``seqs``, emit events; returns the tokens (B, 1)."""
        logits = logits.float()
        next_ids = logits.argmax(dim=-1)  # (B,) greedy rows are done here, in one call
        sampled = [i for i, seq in enumerate(seqs) if seq.params.temperature >= GREEDY_BELOW]
        if sampled:
            next_ids[sampled] = sample_rows(logits[sampled], [seqs[i].params for i in sampled],
                                            [seqs[i].generator for i in sampled])
        want_lp = any(s.params.logprobs is not None for s in seqs)
        logprobs_all = F.log_softmax(logits, dim=-1) if want_lp else None
        tokens = next_ids.tolist()
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            lp = None
            if logprobs_all is not None and seq.params.logprobs is not None:
                lp = [_token_logprob(logprobs_all[i], tokens[i], seq.params.logprobs)]
            self._advance(seq, tokens[i], lp, now, prompt_lp[i] if prompt_lp else None)
        return next_ids.view(-1, 1)

    def _advance(self, seq: _Sequence, token: int, lp: list[TokenLogprob] | None, now: float,
                 prompt_lp: list[TokenLogprob] | None) -> None:
        """Append one token to ``seq``: detokenize, check stop conditions, emit."""
        seq.tokens.append(token)
        p = seq.params
        finish = None
        start = len(seq.text)
        if token == self.config.eos_token_id:
            finish = "stop"
            seq.text += seq.detok.flush()
        else:
            seq.text += seq.detok.push(token)
            if len(seq.tokens) >= p.max_tokens or len(seq.prompt) + len(seq.tokens) >= self.config.n_ctx:
                finish = "length"
                seq.text += seq.detok.flush()
        if p.stop:
            longest = max(len(s) for s in p.stop)
            window = max(0, start - longest + 1)
            hits = [pos for s in p.stop if (pos := seq.text.find(s, window)) != -1]
            if hits:
                seq.text = seq.text[: min(hits)]
                finish = "stop"
        if finish is None:
            # Hold back a tail that could still grow into a stop string.
            holdback = max((len(s) for s in p.stop), default=1) - 1
            end = max(seq.emitted, len(seq.text) - holdback)
        else:
            end = len(seq.text)
        text = seq.text[seq.emitted:end]
        seq.emitted = end
        if finish is None:
            seq.emit(SequenceEvent([token], text, now, lp, prompt_lp, width=seq.width))
        else:
            # Count the slot free before the consumer hears of the end; _drop_finished removes the row.
            self._release(seq)
            self._finish_event(seq, [token], lp, finish, text=text, prompt_logprobs=prompt_lp, now=now)

    def _finish_event(self, seq: _Sequence, token_ids: list[int], lp, reason: str, text: str = "",
                      prompt_logprobs=None, now: float | None = None) -> None:
        seq.emit(SequenceEvent(token_ids, text, time.monotonic() if now is None else now, lp, prompt_logprobs,
                               finish_reason=reason, prompt_tokens=len(seq.prompt),
                               completion_tokens=len(seq.tokens), queue_s=seq.queue_s, width=seq.width))

    def _drop_finished(self, group: _Group, registered: bool = True) -> None:
        keep = [i for i, s in enumerate(group.seqs) if not s.finished]
        if len(keep) < len(group.seqs):
            for s in group.seqs:
                if s.finished:
                    self._release(s)
            self._keep_rows(group, keep, registered)

    def _keep_rows(self, group: _Group, keep: list[int], registered: bool = True) -> None:
        """Gather the surviving rows and trim leading columns that are padding in every row."""
        if not keep:
            group.seqs = []
            if registered:
                del self._groups[group.width]
            return
        index = torch.tensor(keep, device=self.device)
        mask = group.mask.index_select(0, index)
        lead = int(mask.any(dim=0).int().argmax())  # first column holding a real token
        group.mask = mask[:, lead:]
        group.cache = StaticKVCache.from_list(
            [(k.index_select(0, index)[:, :, lead:], v.index_select(0, index)[:, :, lead:])
             for k, v in group.cache.as_list()],
            capacity=group.cache.capacity - lead)
        group.next_ids = group.next_ids.index_select(0, index)
        group.seqs = [group.seqs[i] for i in keep]

    def _merge(self, new: _Group) -> None:
        """Add freshly prefilled rows to the running group they join (left-padding the shorter);
        a mixed group keeps its rows widest first, so each FFN block runs on a prefix of rows."""
        key = MIXED if self.mixed else new.width
        old = self._groups.get(key)
        if old is None:
            new.width = key
            self._groups[key] = new
            self._sort_widest_first(new)
            return
        L, P = old.mask.shape[1], new.mask.shape[1]
        T = max(L, P)
        merged = [
            (torch.cat([F.pad(ko, (0, 0, T - L, 0)), F.pad(kn, (0, 0, T - P, 0))]),
             torch.cat([F.pad(vo, (0, 0, T - L, 0)), F.pad(vn, (0, 0, T - P, 0))]))
            for (ko, vo), (kn, vn) in zip(old.cache.as_list(), new.cache.as_list(), strict=True)
        ]
        old.cache = StaticKVCache.from_list(merged, capacity=max(old.cache.capacity - L, new.cache.capacity - P) + T)
        old.mask = torch.cat([F.pad(old.mask, (T - L, 0)), F.pad(new.mask, (T - P, 0))])
        old.next_ids = torch.cat([old.next_ids, new.next_ids])
        old.seqs = old.seqs + new.seqs
        self._sort_widest_first(old)

    @staticmethod
    def _rows_by_width(seqs: list[_Sequence]) -> dict[str, int]:
        rows: dict[str, int] = {}
        for seq in seqs:
            rows[seq.width] = rows.get(seq.width, 0) + 1
        return rows

    def _sort_widest_first(self, group: _Group) -> None:
        """Reorder a mixed group's rows by FFN size, widest first (stable; a no-op when sorted)."""
        if group.width != MIXED:
            return
        sizes = [self._ffn_size[s.width] for s in group.seqs]
        order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
        if order == list(range(len(sizes))):
            return
        index = torch.tensor(order, device=self.device)
        group.cache = StaticKVCache(
            [k.index_select(0, index) for k in group.cache.keys], [v.index_select(0, index) for v in group.cache.values],
            group.cache.length)
        group.mask = group.mask.index_select(0, index)
        group.next_ids = group.next_ids.index_select(0, index)
        group.seqs = [group.seqs[i] for i in order]

    def _capacity(self, length: int, seqs: list[_Sequence]) -> int:
        """Initial cache capacity: room for the longest generation in the group, within the context."""
        longest = max(s.params.max_tokens for s in seqs)
        return min(self.config.n_ctx, length + longest)

    def _prompt_logprobs(self, logits: torch.Tensor, seq: _Sequence) -> list[TokenLogprob]:
        """Logprob of every prompt token given the ones before it (the first has none)."""
        lp = F.log_softmax(logits[:-1].float(), dim=-1)  # (P-1, V): position t predicts token t+1
        targets = torch.tensor(seq.prompt[1:], device=lp.device)
        chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
        k = seq.params.logprobs or 0
        tops: list[tuple] = [()] * len(chosen)
        if k > 0:
            values, ids = lp.topk(k, dim=-1)
            tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return [TokenLogprob(seq.prompt[0], None)] + [
            TokenLogprob(t, c, top) for t, c, top in zip(seq.prompt[1:], chosen, tops, strict=True)
        ]


def _threadsafe_emit(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int) -> Callable:
    def emit(event: SequenceEvent) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass

    return emit


def _target(seq: _Sequence) -> float:
    """When a sequence should be done: its shedding deadline (the SLO less the server's own margin),
    else its SLO deadline, else never."""
    p = seq.params
    return p.deadline if p.deadline is not None else p.slo_deadline if p.slo_deadline is not None else float("inf")


MIXED = "*"  # the key of the one group of every width, when the engine decodes mixed widths together

# Temperatures below this decode greedily, as vLLM does: logits / 1e-300 overflows to inf and NaN.
GREEDY_BELOW = 1e-5


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``logits`` (B, V) from softmax(logits / temperature) restricted to the
    row's top-p nucleus, for the whole batch in tensor ops.

    Draws use the exponential race (argmax of p / E with E ~ Exp(1) is a draw from p): unseeded
    rows take their noise in one call, a seeded row from its own generator, so its tokens do not
    depend on what else is in the batch.
    """
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    if bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]
        outside[:, 0] = False  # a top_p below float32's resolution (5e-324) would otherwise drop every token
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    for i, generator in enumerate(generators):
        if generator is not None:
            noise[i].exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def _token_logprob(logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = logprobs.topk(k)
        top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token_id, float(logprobs[token_id]), top)
