"""The seam between the one OpenAI front end (:mod:`serving.api.frontend`) and what generates tokens.

``matta serve`` plugs in :class:`serving.api.engine_backend.EngineBackend` (the checkpoint's engine),
``matta route`` plugs in :class:`serving.api.route.HttpBackend` (one OpenAI-compatible server per
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
from serving.api.protocol import CompletionRequest
from serving.messages import Load, Slo


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

    Finish reasons beyond OpenAI's "stop" / "length": "abort" (the engine stopped or failed),
    "shed" (it could not serve the prompt within the request's SLO) and "queue_full" (no room).
    """

    text: str
    time: float  # time.monotonic() when it was produced
    tokens: int = 0
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    queue_s: float | None = None  # submit -> first scheduled, when the backend knows it
    width: str | None = None  # the width served, when the backend chose it at dispatch
    predicted_s: float | None = None  # the backend's predicted arrival -> last token, when it made one


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
    """What the front end needs of a token generator; raises :class:`serving.api.http.APIError` for client errors."""

    name: str  # the routed model id; '<name>:<width>' pins a width
    widths: list[str]  # narrowest first
    max_model_len: int | None  # context window, when known
    vocab_size: int | None  # token-id bound, when known
    cost: CostModel | None  # how long a request will take here (the slo policy's predictor at arrival)
    # It chooses a request's width (among the widths it is given), admits and refuses it itself,
    # when the request gets a batch slot: the engine's scheduler does; a proxy cannot.
    dispatches_width: bool

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

    def engine_counters(self) -> Load | None:
        """The engine's own counters, its :class:`~serving.messages.Load` (decode forwards by
        path, compiled steps loaded, busy seconds per phase, iteration overruns); None for a
        backend without an engine of its own."""
        ...

    async def submit(self, prompts: PreparedPrompts, widths: tuple[str, ...], body: CompletionRequest,
                     slo: Slo) -> CompletionStream:
        """Start generating every prompt at one of ``widths`` (narrowest first); APIError 429/503 when
        it cannot take them now (a proxy relays its upstream's refusal with the upstream's status).

        A backend that ``dispatches_width`` picks the width among ``widths`` when the request gets
        its batch slot, aiming at ``slo``'s targets, and refuses a prompt it cannot serve in time
        when ``slo.shed`` (final delta "shed"); the deltas name the width. Any other backend serves
        ``widths[0]``.
        """
        ...

    async def health(self) -> tuple[bool, dict]:
        """Whether this backend can serve, and what ``/health`` should say about it."""
        ...
