"""What the front end knows of one request while it runs: its latency targets, how it was routed,
and what each of its prompts has produced so far. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.policy import LoadSnapshot, RequestInfo
from serving.api.backend import LogprobEntry
from serving.messages import Slo


@dataclass(frozen=True)
class SloTargets:
    """A request's latency targets in ms (None: not set): end to end, first token, per output token."""

    e2e_ms: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    @property
    def any(self) -> bool:
        return self.e2e_ms is not None or self.ttft_ms is not None or self.tpot_ms is not None

    def slo(self, arrival: float, shed: bool) -> Slo:
        """The targets as the scheduler takes them: instants on the monotonic clock."""
        return Slo(e2e_deadline=None if self.e2e_ms is None else arrival + self.e2e_ms / 1000,
                   ttft_deadline=None if self.ttft_ms is None else arrival + self.ttft_ms / 1000,
                   tpot_s=None if self.tpot_ms is None else self.tpot_ms / 1000, shed=shed)

    def met(self, e2e_s: float, ttft_s: float | None, tpot_s: float | None) -> bool:
        """Good only if every target set is met (vLLM's and DistServe's goodput)."""
        return ((self.e2e_ms is None or e2e_s <= self.e2e_ms / 1000)
                and (self.ttft_ms is None or (ttft_s is not None and ttft_s <= self.ttft_ms / 1000))
                and (self.tpot_ms is None or tpot_s is None or tpot_s <= self.tpot_ms / 1000))

    def describe(self) -> str:
        parts = [f"{name} {value:g} ms" for name, value in
                 (("end to end", self.e2e_ms), ("first token", self.ttft_ms), ("per token", self.tpot_ms))
                 if value is not None]
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class Route:
    """How a request was routed, for the SLO metrics, the cost model and the A/B log when it ends."""

    width: str
    reason: str
    targets: SloTargets
    predicted_s: float | None
    info: RequestInfo
    load: LoadSnapshot
    policy: str = ""  # name of the policy that chose (the server's, or the A/B arm's)
    request_id: str = ""
    arm: str | None = None  # A/B arm, when the request is in an experiment
    experiment: str | None = None
    unit: str | None = None
    assignment: str | None = None

    @property
    def slo_s(self) -> float | None:
        return None if self.targets.e2e_ms is None else self.targets.e2e_ms / 1000


@dataclass
class Choice:
    """What one prompt of a request has produced so far, plus its timings for the metrics."""

    text: str = ""
    tokens: int = 0
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    text_offset: int = 0  # characters already streamed (logprobs text_offset when streaming)


def ttft_tpot(choices: list[Choice], started: float) -> tuple[float | None, float | None]:
    """The request's time to first token and time per output token (vLLM's definitions, the worst
    prompt's): TPOT = (last token - first token) / (tokens - 1)."""
    firsts = [c.first_token_at for c in choices if c.first_token_at is not None]
    ttft = max(firsts) - started if len(firsts) == len(choices) and firsts else None
    tpots = [(c.last_token_at - c.first_token_at) / (c.tokens - 1) for c in choices
             if c.first_token_at is not None and c.tokens > 1]
    return ttft, max(tpots) if tpots else None
