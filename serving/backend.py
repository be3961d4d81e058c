"""The seam between the one OpenAI front end (:mod:`serving.frontend`) and what generates tokens.

``matta serve`` plugs in :class:`serving.engine_backend.EngineBackend` (the checkpoint's engine),
``matta route`` plugs in :class:`serving.route.HttpBackend` (one OpenAI-compatible server per
width). The front end does everything a client sees (validation, model ids and pins, the width
policy, A/B arms, SLO accounting, metrics, error bodies, JSON or SSE); a backend only prepares
prompts, reports its load and streams what each prompt produced. Torch-free.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.cost import CostModel
from router.policy import LoadSnapshot
from serving.protocol import CompletionRequest


@dataclass(frozen=True)
class PreparedPrompts:
    """A request's prompts as the backend will run them, and what the policy needs to know of them."""

    n_prompts: int
    prompt_tokens: int  # all prompts together (a backend without a tokenizer estimates)
    longest_prompt: int  # tokens of the longest prompt: bounds what max_tokens can generate
    payload: Any = None  # the backend's own form (token ids for the engine, the raw prompt for a proxy)


@dataclass(frozen=True)
class LogprobEntry:
    """One token of a ``logprobs`` answer, already as text; ``logprob`` is None for the first prompt token."""

    token: str
    logprob: float | None
    top: dict[str, float] | None = None


@dataclass
class Delta:
    """What one prompt produced since the last delta: new text (an echoed prompt first, when asked),
    the generated tokens it holds, their logprobs, and at the end the finish reason and totals.

    Finish reasons beyond OpenAI's "stop" / "length": "abort" (the engine stopped or failed) and
    "shed" (it could not start the prompt in time for the request's deadline).
    """

    text: str
    time: float  # time.monotonic() when it was produced
    tokens: int = 0
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    queue_s: float | None = None  # submit -> first scheduled, when the backend knows it
    width: str | None = None  # the width served, when the backend chose it at dispatch


class BackendError(Exception):
    """The backend failed while a request was under way (a proxy's upstream died or answered
    nonsense); the front end turns it into an error response or a final SSE error event."""

    def __init__(self, status: int, message: str, code: str, type_: str = "service_unavailable") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type_


class CompletionStream(Protocol):
    """``async for index, delta in stream``; ends after every prompt's final delta.

    :meth:`cancel` is idempotent and frees whatever the request holds (batch slots, an upstream
    connection); the front end calls it on every path. ``usage``, once the stream has ended, is
    (prompt tokens, completion tokens) as the backend counted them, when it did.
    """

    usage: tuple[int, int] | None

    def __aiter__(self) -> AsyncIterator[tuple[int, Delta]]: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    """What the front end needs of a token generator; raises :class:`serving.http.APIError` for client errors."""

    name: str  # the routed model id; '<name>:<width>' pins a width
    widths: list[str]  # narrowest first
    max_model_len: int | None  # context window, when known
    vocab_size: int | None  # token-id bound, when known
    cost: CostModel | None  # how long a request will take here (the slo policy's predictor)
    dispatches_width: bool  # it can choose a request's width when the request gets a batch slot

    @property
    def accepting(self) -> bool: ...

    def lifespan(self) -> AbstractAsyncContextManager[None]:
        """Start on entry (engine thread, HTTP client), stop and release everything on exit."""
        ...

    def prepare(self, prompt: Any) -> PreparedPrompts:
        """Check and convert a request's ``prompt``; APIError 400/413 for prompts it cannot take."""
        ...

    def load(self) -> LoadSnapshot:
        """The load now, for the policy and the gauges."""
        ...

    def engine_counters(self) -> dict[str, Any] | None:
        """The engine's own counters: ``compiled_steps``, ``eager_steps`` (decode forwards by how they
        ran), ``ready`` and ``signatures`` (compiled steps loaded of those it can meet), and ``busy_s``
        (the scheduler's seconds per phase, ``serving.engine.BUSY_PHASES``); None for a backend
        without an engine of its own."""
        ...

    async def submit(self, prompts: PreparedPrompts, width: str, body: CompletionRequest,
                     deadline: float | None, candidates: tuple[str, ...] = (),
                     slo_deadline: float | None = None) -> CompletionStream:
        """Start generating every prompt at ``width``; APIError 429/503 when it cannot take them now
        (a proxy relays its upstream's refusal with the upstream's status).

        ``deadline`` (time.monotonic()) is when a prompt still waiting for a batch slot can no
        longer finish within its SLO: a backend that queues sheds it then ("shed"). With
        ``candidates`` a backend that ``dispatches_width`` serves the width it picks among them
        when the request gets its slot, aiming at ``slo_deadline``; the deltas name it.
        """
        ...

    async def health(self) -> tuple[bool, dict]:
        """Whether this backend can serve, and what ``/health`` should say about it."""
        ...
