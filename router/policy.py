"""The width-choice seam: which nested width serves a request, given the request, the load and a clock.

Pure Python (no torch): policies are unit-tested with fake loads and a fake clock, and the
serving engine, the standalone router and the A/B layer all ask the same interface. A policy
implements :class:`WidthPolicy`; :mod:`router.policies` builds one from its name, ``--policy kind[:arg]``
(``fixed:<width>``, ``slo`` from :mod:`router.slo`).

Pinned widths (``model: "<name>:<width>"`` or the body's ``width``) are not a policy's business:
:func:`decide_width` serves them before any policy is asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know about one request (all prompts of a request share one width)."""

    pinned_width: str | None = None
    latency_slo_ms: float | None = None
    max_tokens: int = 16
    prompt_tokens: int = 0
    user: str | None = None
    n_prompts: int = 1


@dataclass(frozen=True)
class LoadSnapshot:
    """The serving engine's load when the request arrives."""

    waiting: int = 0
    running: int = 0
    running_by_width: Mapping[str, int] = field(default_factory=dict)
    waiting_by_width: Mapping[str, int] = field(default_factory=dict)
    max_batch: int = 1
    max_queue: int = 1
    # The running batch groups, {width: (rows, cache length in tokens)}, and the tokens each
    # running sequence may still generate (ascending): what a latency prediction needs.
    groups: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    remaining_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class WidthDecision:
    """The width to serve and why (``reason`` is logged and becomes a metric label).

    ``predicted_s`` is the policy's predicted end-to-end latency at that width, when it made
    one; ``shed`` asks the server to refuse the request (429 + Retry-After) instead.
    """

    width: str
    reason: str
    predicted_s: float | None = None
    shed: bool = False
    # Widths (narrowest first) the backend may choose among when the request gets its batch slot,
    # when it chooses at dispatch (PolicyContext.dispatch); ``width`` is then provisional.
    candidates: tuple[str, ...] = ()


@runtime_checkable
class LatencyPredictor(Protocol):
    """Predicts a request's end-to-end seconds at a width under a load (engine profile or backends)."""

    def predict_s(self, width: str, request: RequestInfo, load: LoadSnapshot) -> float: ...


@dataclass(frozen=True)
class PolicyContext:
    """What a server knows that policies may need; each policy reads only its part."""

    predictor: LatencyPredictor | None = None
    default_slo_ms: float | None = None  # for requests that give no latency_slo_ms
    min_width: str | None = None  # quality floor for load-adaptive policies
    shed: bool = False  # refuse requests no width can serve in time (else best effort at the floor)
    # The backend picks the width when a request is dispatched (the engine does; a proxy cannot):
    # a policy may then leave it a range of widths instead of one.
    dispatch: bool = False


@runtime_checkable
class WidthPolicy(Protocol):
    """Chooses a width for an unpinned request. Must be cheap, pure and thread-safe."""

    name: str

    def choose(self, request: RequestInfo, load: LoadSnapshot, now: float) -> WidthDecision:
        """The width for ``request`` under ``load`` at time ``now`` (seconds, monotonic)."""
        ...


class FixedPolicy:
    """Always the same width: the default, and the control arm of width experiments."""

    def __init__(self, width: str) -> None:
        self.width = width
        self.name = f"fixed:{width}"

    def choose(self, request: RequestInfo, load: LoadSnapshot, now: float) -> WidthDecision:
        return WidthDecision(self.width, "fixed")

    def __repr__(self) -> str:
        return f"FixedPolicy({self.width!r})"


def decide_width(policy: WidthPolicy, request: RequestInfo, load: LoadSnapshot, now: float) -> WidthDecision:
    """A pinned width always wins; otherwise the policy chooses."""
    if request.pinned_width is not None:
        return WidthDecision(request.pinned_width, "pinned")
    return policy.choose(request, load, now)
