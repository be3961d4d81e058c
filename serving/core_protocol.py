"""Messages between the API process and the engine-core process (:mod:`serving.core`).

MessagePack through ``msgspec`` over ZMQ, never pickle: every message is one of the typed
structs below, decoded against its union, so a malformed message is an error, not code. The core
sends one :class:`StepOutput` per scheduler iteration carrying every sequence's new tokens and a
:class:`Load` snapshot that the width policy reads. Torch-free.
"""

from __future__ import annotations

import msgspec

# --- API process -> core -----------------------------------------------------------------------


class Sampling(msgspec.Struct, frozen=True):
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    logprobs: int | None
    prompt_logprobs: bool
    deadline: float | None  # time.monotonic() (one clock for every process on the machine)
    widths: tuple[str, ...]  # chosen among at dispatch, narrowest first (empty: the request's width)
    slo_deadline: float | None


class Add(msgspec.Struct, tag=True, frozen=True):
    """Queue one sequence per prompt of request ``request_id``, all at ``width``."""

    request_id: int
    prompts: list[list[int]]
    width: str
    sampling: Sampling


class Cancel(msgspec.Struct, tag=True, frozen=True):
    request_id: int


class Stop(msgspec.Struct, tag=True, frozen=True):
    """Abort what is left and exit (the API process has drained its requests first)."""


CoreInput = Add | Cancel | Stop

# --- core -> API process -----------------------------------------------------------------------

Logprob = tuple[int, float | None, list[tuple[int, float]]]  # token id, its logprob, the top alternatives


class SequenceOutput(msgspec.Struct, array_like=True, frozen=True):
    """What one step produced for prompt ``index`` of request ``request_id`` (see SequenceEvent)."""

    request_id: int
    index: int
    token_ids: list[int]
    text: str
    time: float
    logprobs: list[Logprob] | None
    prompt_logprobs: list[Logprob] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    width: str | None  # the width served (chosen at dispatch, when it was)


class Load(msgspec.Struct, frozen=True):
    """The core's load after a step: what the policy and ``/metrics`` read."""

    running: int
    waiting: int
    running_by_width: dict[str, int]
    waiting_by_width: dict[str, int]
    max_batch: int
    max_queue: int
    steps: int
    finished: int
    cancelled: int
    groups: dict[str, tuple[int, int]]
    remaining_tokens: list[int]
    recent_iteration_s: float
    corrections: dict[str, float]  # the latency model's online corrections, measured in the core
    compiled_steps: int = 0
    eager_steps: int = 0
    compile_ready: int = 0
    compile_signatures: int = 0
    busy_s: dict[str, float] = {}
    compile_faults: dict[str, int] = {}


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
