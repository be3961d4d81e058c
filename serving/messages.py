"""The engine's own types, and the messages between the API process and the engine core.

MessagePack through ``msgspec`` over ZMQ, never pickle: every message is one of the typed
structs below, decoded against its union, so a malformed message is an error, not code. These
structs are also what the engine works with on either side (no mirror types): the front end
builds an :class:`Add`, the scheduler (:mod:`serving.engine.scheduler`) reads its widths and
:class:`Slo`, the model runner its :class:`Sampling`, and the output processor produces the
:class:`SequenceOutput` that the API process streams. After every iteration the core publishes
one :class:`Load`, the one load view of the server. Torch-free.
"""

from __future__ import annotations

import msgspec

# --- API process -> core -----------------------------------------------------------------------

# Temperatures below this decode greedily, as vLLM does: logits / 1e-300 overflows to inf and NaN.
GREEDY_BELOW = 1e-5


class Sampling(msgspec.Struct, frozen=True):
    """How one sequence is generated. ``temperature == 0`` (or below ``GREEDY_BELOW``) is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per token; None: no logprobs at all
    prompt_logprobs: bool = False  # also score the prompt tokens (echo + logprobs)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


class Slo(msgspec.Struct, frozen=True):
    """What a request asks of time; instants are ``time.monotonic()`` (one clock for every process
    on the machine). A request is good only if it meets every target it set (DistServe's goodput).

    ``shed``: refuse the request (finish reason "shed") when the scheduler predicts it cannot meet
    its targets, rather than serve it late.
    """

    e2e_deadline: float | None = None  # the whole answer by then (latency_slo_ms)
    ttft_deadline: float | None = None  # its first token by then (ttft_slo_ms)
    tpot_s: float | None = None  # mean seconds per output token after the first (tpot_slo_ms)
    shed: bool = False


NO_SLO = Slo()


class Add(msgspec.Struct, tag=True, frozen=True):
    """Queue one sequence per prompt of request ``request_id``, all or none.

    ``widths`` (narrowest first) are the widths the scheduler may serve it at; one width pins it.
    ``stream``: an output per token; otherwise a sequence's first token (it names the width) and
    then everything else at its end, so a whole answer costs the API process two messages, not one
    per token. ``width_changes``: the scheduler may change the width of its running sequences
    (when the server allows it; a pinned request never changes).
    """

    request_id: int
    prompts: list[list[int]]
    widths: tuple[str, ...]
    sampling: Sampling
    slo: Slo = NO_SLO
    arrival: float = 0.0  # time.monotonic() the request arrived (0: when the core read it)
    stream: bool = True
    width_changes: bool = True


class Cancel(msgspec.Struct, tag=True, frozen=True):
    request_id: int


class Stop(msgspec.Struct, tag=True, frozen=True):
    """Abort what is left and exit (the API process has drained its requests first)."""


CoreInput = Add | Cancel | Stop

# --- core -> API process -----------------------------------------------------------------------

Logprob = tuple[int, float | None, list[tuple[int, float]]]  # token id, its logprob, the top alternatives

# Finish reasons beyond OpenAI's "stop" and "length": the scheduler refused the sequence because
# it could not meet its SLO ("shed") or the queue had no room ("queue_full"), or the engine
# stopped or failed ("abort").
REFUSALS = ("shed", "queue_full")


class SequenceOutput(msgspec.Struct, array_like=True, frozen=True):
    """What one iteration produced for prompt ``index`` of request ``request_id``.

    ``text`` is new completion text; text that could still become part of a stop string is held
    back until it cannot. The last output of a sequence has ``finish_reason`` set and the totals.
    """

    request_id: int
    index: int
    token_ids: list[int]
    text: str
    time: float  # time.monotonic() when the iteration finished
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob] | None = None  # first output only
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0  # arrival -> admitted (final output only)
    width: str | None = None  # the width the sequence is served at now (chosen at dispatch, changed mid-generation)
    predicted_s: float | None = None  # the scheduler's predicted arrival -> last token, at admission
    widths: list[tuple[str, int]] | None = None  # final output: every (width, first token generated at it)


BUSY_PHASES = ("prefill", "decode", "swap_in")  # where the core's iterations spend their time


class Load(msgspec.Struct, frozen=True):
    """The core's load after an iteration: the one view that /health, /metrics and the API read."""

    running: int = 0
    waiting: int = 0
    running_by_width: dict[str, int] = {}
    waiting_by_width: dict[str, int] = {}  # waiting sequences by the narrowest width they may take
    max_batch: int = 1
    max_queue: int = 1
    steps: int = 0  # decode forwards since start
    finished: int = 0
    cancelled: int = 0
    shed: int = 0  # sequences refused for their SLO (at arrival or while waiting)
    groups: dict[str, tuple[int, int]] = {}  # width -> (running rows, cache length)
    remaining_tokens: list[int] = []  # tokens each running sequence may still generate, ascending
    corrections: dict[str, float] = {}  # the latency model's online corrections
    compiled_steps: int = 0
    eager_steps: int = 0
    compile_ready: int = 0  # step signatures with a compiled graph loaded
    compile_signatures: int = 0  # step signatures the engine can meet (0: compilation off)
    busy_s: dict[str, float] = {}  # seconds per phase (BUSY_PHASES)
    iterations: int = 0  # iterations that ran a prefill, a decode step or a swap-in
    overrun_s: float = 0.0  # seconds iterations ran past their prediction, summed
    overruns_2x: int = 0  # iterations that took more than twice their prediction
    swap_ins_deferred: int = 0  # iterations that kept a compiled step waiting to protect a deadline
    compile_faults: dict[str, int] = {}  # compile-cache faults by kind (serving/worker/compiled.py)
    core_restarts: int = 0  # engine cores started again after one died (counted by the API process's client)
    width_changes: dict[str, int] = {}  # "from->to" -> running sequences whose width the scheduler changed
    prefilling: int = 0  # running sequences still prefilling their prompt in chunks (chunked prefill)
    prefill_chunks: int = 0  # prompt chunks run that were not a whole prompt (chunked prefill), since start


class StepOutput(msgspec.Struct, tag=True, frozen=True):
    outputs: list[SequenceOutput]
    load: Load


class Ready(msgspec.Struct, tag=True, frozen=True):
    """The core is up; ``profile`` is the latency profile it serves with (JSON), when it has one."""

    profile: dict | None


class Failed(msgspec.Struct, tag=True, frozen=True):
    """The core could not start (bad checkpoint, profile, device): the message says why."""

    message: str


CoreOutput = StepOutput | Ready | Failed

encoder = msgspec.msgpack.Encoder()
input_decoder = msgspec.msgpack.Decoder(CoreInput)
output_decoder = msgspec.msgpack.Decoder(CoreOutput)
