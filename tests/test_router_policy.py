"""The width-choice seam: pure policies, a fake clock and fake loads, no torch, no server."""

import subprocess
import sys

import pytest

from router.policies import make_policy, register_policy
from router.policy import (
    FixedPolicy,
    LoadSnapshot,
    RequestInfo,
    WidthDecision,
    WidthPolicy,
    decide_width,
)
from tests.helpers import WIDTHS, FakeClock


def busy(running: int = 30, waiting: int = 50) -> LoadSnapshot:
    return LoadSnapshot(waiting=waiting, running=running, running_by_width={"ta": running},
                        waiting_by_width={"ta": waiting}, max_batch=32, max_queue=64)


def test_fixed_policy_ignores_load_and_time():
    policy = make_policy("fixed:m", WIDTHS)
    clock = FakeClock()
    answers = {policy.choose(RequestInfo(max_tokens=n), load, clock.advance(dt)).width
               for n, load, dt in [(1, LoadSnapshot(), 0.0), (500, busy(), 10.0), (16, busy(0, 0), 3600.0)]}
    assert answers == {"m"}
    assert isinstance(policy, WidthPolicy) and policy.name == "fixed:m"


def test_default_policy_is_the_widest_width():
    assert make_policy(None, WIDTHS).choose(RequestInfo(), LoadSnapshot(), 0.0) == WidthDecision("ta", "fixed")
    assert make_policy("fixed", WIDTHS).choose(RequestInfo(), LoadSnapshot(), 0.0).width == "ta"


def test_pinned_width_wins_over_any_policy():
    decision = decide_width(FixedPolicy("s"), RequestInfo(pinned_width="l"), busy(), FakeClock().now)
    assert decision == WidthDecision("l", "pinned")
    assert decide_width(FixedPolicy("s"), RequestInfo(), busy(), 0.0) == WidthDecision("s", "fixed")


@pytest.mark.parametrize("spec, message", [
    ("fixed:xl", "unknown width 'xl'"),
    ("fastest", "unknown policy 'fastest'"),
])
def test_bad_policy_specs_name_the_culprit(spec, message):
    with pytest.raises(ValueError, match=message):
        make_policy(spec, WIDTHS)


def test_a_registered_policy_sees_request_load_and_clock():
    """The seam a latency-aware policy plugs into: request, load snapshot and clock all arrive."""

    class ShedUnderLoad:
        name = "shed"

        def __init__(self, widths):
            self.widths = widths
            self.calm_since = None

        def choose(self, request, load, now):
            if load.waiting > load.max_queue // 2 or (request.latency_slo_ms or 1e9) < 50:
                self.calm_since = None
                return WidthDecision(self.widths[0], "overloaded")
            self.calm_since = self.calm_since if self.calm_since is not None else now
            # Only go back to the widest width after 5 s of calm.
            width = self.widths[-1] if now - self.calm_since >= 5 else self.widths[0]
            return WidthDecision(width, "calm")

    register_policy("shed-test", lambda arg, widths, context: ShedUnderLoad(widths))
    policy = make_policy("shed-test", WIDTHS)
    clock = FakeClock()
    assert decide_width(policy, RequestInfo(), busy(), clock.now).width == "s"
    assert decide_width(policy, RequestInfo(), LoadSnapshot(max_queue=64), clock.advance(1)).width == "s"
    assert decide_width(policy, RequestInfo(), LoadSnapshot(max_queue=64), clock.advance(6)).width == "ta"
    assert decide_width(policy, RequestInfo(latency_slo_ms=10), LoadSnapshot(max_queue=64), clock.now).width == "s"
    assert decide_width(policy, RequestInfo(pinned_width="m"), busy(), clock.now).reason == "pinned"


def test_router_policy_does_not_import_torch():
    code = "import sys, router.policy; assert 'torch' not in sys.modules, 'router.policy imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_router_package_does_not_import_torch():
    """DESIGN: router never imports torch, nor does `matta route`'s front end (the proxy runs without the engine)."""
    code = ("import sys, router.policy, router.policies, router.slo, router.cost, router.latency, router.quality, "
            "router.experiment, router.ab_log, router.ab_analysis, router.sequential, router.guardrails, serving.api.route; "
            "assert 'torch' not in sys.modules, 'the router imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
