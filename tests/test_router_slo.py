"""The latency-aware policy and its latency model: fake clock, fake load, fake or fitted predictors."""

from __future__ import annotations

import json

import pytest

from router.latency import LatencyModel, WidthCost
from router.policies import make_policy
from router.policy import LoadSnapshot, PolicyContext, RequestInfo, WidthDecision, decide_width
from router.slo import ArrivalRate, SloPolicy
from tests.helpers import WIDTHS, FakeClock

# Seconds per request at each width when idle; load multiplies them (the "queue" of the fake).
IDLE_S = {"s": 0.10, "m": 0.15, "l": 0.25, "ta": 0.40}


class FakePredictor:
    """Latency = idle latency of the width x (1 + waiting requests)."""

    def predict_s(self, width: str, request: RequestInfo, load: LoadSnapshot) -> float:
        return IDLE_S[width] * (1 + load.waiting)


def load(waiting: int) -> LoadSnapshot:
    return LoadSnapshot(waiting=waiting, running=0, max_batch=32, max_queue=256)


def slo_policy(**kw) -> SloPolicy:
    return SloPolicy(WIDTHS, FakePredictor(), **kw)


def req(slo_ms: float | None = 500, **kw) -> RequestInfo:
    return RequestInfo(latency_slo_ms=slo_ms, max_tokens=16, prompt_tokens=8, **kw)


# --- the decision table -------------------------------------------------------------------------


def test_idle_server_serves_the_widest_width_that_meets_the_slo():
    policy, now = slo_policy(), FakeClock().now
    assert policy.choose(req(500), load(0), now) == WidthDecision("ta", "slo_met", 0.40)
    assert policy.choose(req(300), load(0), now).width == "l"  # ta (400 ms) misses a 300 ms SLO
    assert policy.choose(req(120), load(0), now).width == "s"


def test_load_moves_requests_to_narrower_widths():
    policy, now = slo_policy(), FakeClock().now
    widths = [policy.choose(req(500), load(waiting), now).width for waiting in (0, 1, 2, 3)]
    assert widths == ["ta", "l", "m", "s"]  # 400, 2x250=500, 3x150=450, 4x100=400 ms


def test_when_no_width_can_make_it_the_request_is_served_best_effort_at_the_floor():
    decision = slo_policy().choose(req(500), load(9), FakeClock().now)  # s: 10 x 100 ms
    assert decision == WidthDecision("s", "best_effort", pytest.approx(1.0))
    assert not decision.shed


def test_shedding_refuses_what_no_width_can_serve_in_time():
    decision = slo_policy(shed=True).choose(req(500), load(9), FakeClock().now)
    assert decision.shed and decision.reason == "shed" and decision.width == "s"
    assert not slo_policy(shed=True).choose(req(500), load(0), FakeClock().now).shed


def test_min_width_is_a_floor_even_when_only_narrower_widths_would_meet_the_slo():
    clock = FakeClock()
    policy = slo_policy(min_width="m")
    assert policy.choose(req(500), load(3), clock.now) == WidthDecision("m", "best_effort", pytest.approx(0.6))
    assert slo_policy(min_width="m", shed=True).choose(req(500), load(3), clock.now).shed
    assert policy.choose(req(500), load(0), clock.advance(2)).width == "ta"


def test_pinned_widths_win_over_the_slo_policy():
    decision = decide_width(slo_policy(), req(10, pinned_width="ta"), load(50), FakeClock().now)
    assert decision == WidthDecision("ta", "pinned")


def test_requests_without_an_slo_get_the_widest_width_unless_the_server_sets_a_default():
    assert slo_policy().choose(req(None), load(9), 0.0).width == "ta"
    assert slo_policy().choose(req(None), load(9), 0.0).reason == "no_slo"
    assert slo_policy(default_slo_ms=500).choose(req(None), load(1), 0.0).width == "l"


def test_hysteresis_no_upgrade_before_the_dwell_time_nor_without_headroom():
    clock = FakeClock()
    policy = slo_policy(headroom=0.25, dwell_s=1.0)
    assert policy.choose(req(500), load(3), clock.now).width == "s"
    # Load is gone, but the class moved down 0.1 s ago: stay narrow for now.
    assert policy.choose(req(500), load(0), clock.advance(0.1)).width == "s"
    # After the dwell time, up again, but only to widths with 25% headroom (<= 375 ms):
    # l (250 ms) has it, ta (400 ms) meets the SLO but has not, so the class stops at l.
    assert policy.choose(req(500), load(0), clock.advance(1.0)).width == "l"
    assert policy.choose(req(500), load(0), clock.advance(5.0)).width == "l"
    # Downgrades are immediate: a width at or below the current one needs only to meet the SLO.
    assert policy.choose(req(500), load(2), clock.advance(0.01)).width == "m"  # l 750, m 450 ms


def test_at_the_current_width_a_prediction_within_the_slo_but_inside_the_headroom_holds():
    clock = FakeClock()
    policy = slo_policy(headroom=0.5, dwell_s=0.0)
    assert policy.choose(req(420), load(0), clock.now).width == "ta"  # starts at the widest: no upgrade
    assert policy.choose(req(420), load(1), clock.advance(1)).width == "m"  # ta 800, l 500 > 420
    # Idle again: l (250 ms) is above 50% of 420 ms, so no upgrade to it; m (150) holds.
    assert policy.choose(req(420), load(0), clock.advance(1)).width == "m"


def test_slo_classes_keep_their_own_hysteresis():
    clock = FakeClock()
    policy = slo_policy(dwell_s=10.0)
    assert policy.choose(req(120), load(0), clock.now).width == "s"  # the tight class goes down
    assert policy.choose(req(5000), load(0), clock.advance(0.1)).width == "ta"  # the loose one is untouched


# --- the load ceiling ------------------------------------------------------------------------------

CAPACITY_RPS = {"s": 100.0, "m": 60.0, "l": 40.0, "ta": 25.0}


class FakeThroughputPredictor(FakePredictor):
    """The fake's latencies plus a fixed full-batch throughput per width."""

    def capacity_rps(self, width: str, request: RequestInfo, load: LoadSnapshot) -> float:
        return CAPACITY_RPS[width]


def arrive_at(policy: SloPolicy, clock: FakeClock, rate: float, seconds: float, slo_ms: float = 5000) -> str:
    """Evenly spaced arrivals at ``rate`` per second; returns the width of the last one."""
    for _ in range(int(rate * seconds)):
        width = policy.choose(req(slo_ms), load(0), clock.advance(1 / rate)).width
    return width


def test_arrival_rate_tracks_a_steady_stream_and_decays_when_it_stops():
    rate, clock = ArrivalRate(window_s=2.0), FakeClock()
    for _ in range(400):
        estimate = rate.arrive(clock.advance(0.025))
    assert estimate == pytest.approx(40.0, rel=0.02)  # 1/spacing + 1/(2 window)
    assert rate.rate(clock.advance(2.0)) == pytest.approx(estimate / 2.718, rel=0.02)
    with pytest.raises(ValueError):
        ArrivalRate(window_s=0)


def test_sustained_load_lowers_the_ceiling_for_everyone_and_calm_raises_it_with_hysteresis():
    clock = FakeClock()
    policy = SloPolicy(WIDTHS, FakeThroughputPredictor(), utilization=0.9, headroom=0.2, dwell_s=0.0)
    assert arrive_at(policy, clock, 20, 5) == "ta"  # 20 <= 0.9 x 25
    assert arrive_at(policy, clock, 50, 5) == "m"  # above l's 36, within m's 54 req/s
    assert arrive_at(policy, clock, 150, 5) == "s"  # beyond every width: the cheapest
    # 20 req/s fits the TA at 0.9 but not with 20% headroom (18): the ceiling stops at l...
    assert arrive_at(policy, clock, 20, 10) == "l"
    assert arrive_at(policy, clock, 15, 10) == "ta"  # ...and reaches the TA once the rate is calm
    # Requests without an SLO get the widest width the load allows, not the TA regardless.
    arrive_at(policy, clock, 150, 5)
    assert policy.choose(req(None), load(0), clock.advance(0.001)) == WidthDecision(
        "s", "no_slo", IDLE_S["s"])


def test_the_ceiling_is_off_at_zero_utilization_or_without_a_throughput_model():
    for policy in (SloPolicy(WIDTHS, FakeThroughputPredictor(), utilization=0.0),
                   SloPolicy(WIDTHS, FakePredictor())):
        assert arrive_at(policy, FakeClock(), 150, 5) == "ta"
    floored = SloPolicy(WIDTHS, FakeThroughputPredictor(), min_width="l")
    assert arrive_at(floored, FakeClock(), 150, 5) == "l"  # the quality floor beats the ceiling


# --- building it by name ------------------------------------------------------------------------


def test_make_policy_builds_slo_with_options_and_server_defaults():
    context = PolicyContext(predictor=FakePredictor(), default_slo_ms=300, min_width="s", shed=False)
    policy = make_policy("slo:min_width=m,shed=true", WIDTHS, context)
    assert isinstance(policy, SloPolicy) and policy.name == "slo"
    assert policy.widths[policy.floor] == "m" and policy.shed and policy.default_slo_ms == 300
    plain = make_policy("slo", WIDTHS, context)
    assert plain.widths[plain.floor] == "s" and not plain.shed


@pytest.mark.parametrize("spec, context, message", [
    ("slo", PolicyContext(), "needs a latency predictor"),
    ("slo:fast=1", PolicyContext(predictor=FakePredictor()), "unknown option"),
    ("slo:min_width=xl", PolicyContext(predictor=FakePredictor()), "unknown min_width 'xl'"),
    ("slo:shed=maybe", PolicyContext(predictor=FakePredictor()), "expected true or false"),
    ("slo:headroom", PolicyContext(predictor=FakePredictor()), "not key=value"),
    ("slo:utilization=1.5", PolicyContext(predictor=FakePredictor()), "utilization must be in"),
])
def test_bad_slo_specs_name_the_problem(spec, context, message):
    with pytest.raises(ValueError, match=message):
        make_policy(spec, WIDTHS, context)


# --- the latency model and the engine predictor ----------------------------------------------------


def cost(scale: float) -> WidthCost:
    return WidthCost(decode_base=0.001 * scale, decode_per_row=1e-4 * scale, decode_per_row_token=1e-6,
                     prefill_base=0.001, prefill_per_token=1e-5 * scale)


def model() -> LatencyModel:
    return LatencyModel({"s": cost(1.0), "m": cost(1.5), "l": cost(2.5), "ta": cost(4.0)}, alpha=0.1)


def test_online_correction_converges_to_the_observed_speed_per_path_and_is_bounded():
    m = model()
    groups = {"ta": (8, 100)}
    predicted = m.step_s(groups)
    for _ in range(200):
        m.observe_step(groups, "eager", 2 * predicted)  # this machine is twice as slow
    assert m.step_s(groups) == pytest.approx(2 * predicted, rel=0.01)
    # A path not measured yet borrows eager's factor; once measured it has its own.
    assert m.step_s(groups, "compiled") == pytest.approx(m.step_s(groups))
    for _ in range(200):
        m.observe_step(groups, "compiled", predicted)
    assert m.step_s(groups, "compiled") == pytest.approx(predicted, rel=0.01)
    assert m.step_s(groups) == pytest.approx(2 * predicted, rel=0.01)
    for _ in range(200):
        m.observe_prefill("s", 64, 1e9)  # absurd observations are clipped, not followed
    assert m.corrections()["prefill:s"] == pytest.approx(20.0)
    other = model()
    other.set_corrections(m.corrections())  # what the engine core measured, read elsewhere
    assert other.corrections() == pytest.approx(m.corrections())


def test_step_corrections_are_per_batch_size_and_an_unmeasured_batch_borrows_the_safe_factor():
    """Compiled steps measured at batch 1 (where compiling gains most) do not price a batch of 16:
    that batch borrows eager's factor until compiled steps of its size are measured."""
    m = model()
    solo, burst = {"ta": (1, 50)}, {"ta": (16, 50)}
    for _ in range(100):
        m.observe_step(solo, "eager", 1.5 * m.profiled_step_s(solo))  # the machine: 1.5x the profile
        m.observe_step(solo, "compiled", 0.5 * m.profiled_step_s(solo))
    assert m.step_s(solo, "compiled") == pytest.approx(0.5 * m.profiled_step_s(solo), rel=0.01)
    # Batch 16 was measured on neither path: eager's largest factor, for both.
    assert m.step_s(burst, "compiled") == pytest.approx(1.5 * m.profiled_step_s(burst), rel=0.01)
    assert m.step_s(burst, "eager") == pytest.approx(1.5 * m.profiled_step_s(burst), rel=0.01)
    for _ in range(100):
        m.observe_step(burst, "compiled", 0.9 * m.profiled_step_s(burst))
    assert m.step_s(burst, "compiled") == pytest.approx(0.9 * m.profiled_step_s(burst), rel=0.01)
    assert m.step_factor("compiled", 20, "ta") == m.step_factor("compiled", 31, "ta") == m.step_factor(
        "compiled", 16, "ta")  # one bucket
    assert m.corrections()["step:compiled:b16:ta"] == pytest.approx(0.9, rel=0.01)
    assert m.corrections()["step:compiled:b1:ta"] == pytest.approx(0.5, rel=0.01)


def test_step_corrections_are_per_width_class_so_one_class_does_not_price_another():
    """Measured on the shipped checkpoint, compiled: a Student step at 0.4x its eager profile, a TA
    or mixed step at 1.0x. Learned in one factor, whichever ran last priced the other up to 2x
    wrong (Student rows priced twice as slow were refused); each class keeps its own, and a class
    not measured yet at a batch borrows eager's for that class, not another class's."""
    m = model()
    student, ta, mixed = {"s": (16, 50)}, {"ta": (16, 50)}, {"s": (8, 50), "ta": (8, 50)}
    for _ in range(100):
        for groups in (student, ta, mixed):
            m.observe_step(groups, "eager", 1.2 * m.profiled_step_s(groups))
        m.observe_step(ta, "compiled", 1.0 * m.profiled_step_s(ta))
        m.observe_step(student, "compiled", 0.4 * m.profiled_step_s(student))
    assert m.step_s(student, "compiled") == pytest.approx(0.4 * m.profiled_step_s(student), rel=0.01)
    assert m.step_s(ta, "compiled") == pytest.approx(1.0 * m.profiled_step_s(ta), rel=0.01)
    assert m.step_s(mixed, "compiled") == pytest.approx(1.2 * m.profiled_step_s(mixed), rel=0.01)  # eager's, borrowed
    assert m.step_s({"s": (16, 50), "m": (0, 0)}, "compiled") == m.step_s(student, "compiled")  # an empty group is no width
    # Measured elsewhere and read here, class by class; a name without a class sets them all.
    other = model()
    other.set_corrections(m.corrections())
    assert other.corrections() == pytest.approx(m.corrections())
    other.set_corrections({"step:eager:b16": 3.0})
    assert other.step_s(mixed) == pytest.approx(3.0 * m.profiled_step_s(mixed))
    assert other.step_s(student) == pytest.approx(3.0 * m.profiled_step_s(student))
    with pytest.raises(ValueError, match="mixed"):
        LatencyModel({"mixed": cost(1.0)})


def test_a_profile_round_trips_through_json_and_bad_files_are_refused(tmp_path):
    m = model()
    path = m.save(tmp_path / "profile.json")
    again = LatencyModel.load(path)
    assert again.costs == m.costs and again.mixed_factor == 1.0
    m.mixed_factor = 1.17
    assert LatencyModel.load(m.save(tmp_path / "mixed.json")).mixed_factor == 1.17
    (tmp_path / "negative.json").write_text(json.dumps({**m.to_json(), "mixed_factor": -1}))
    with pytest.raises(ValueError, match="mixed_factor"):
        LatencyModel.load(tmp_path / "negative.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a matta latency profile"):
        LatencyModel.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="invalid JSON"):
        LatencyModel.load(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="no such latency profile"):
        LatencyModel.load(tmp_path / "missing.json")


def test_a_mixed_width_step_pays_the_fixed_cost_of_a_forward_once():
    """The engine decodes every width in one forward: the prediction of a mixed step is the widest
    present width's fixed cost plus each width's per-row costs, not the sum of one-width steps."""
    m = LatencyModel({"s": WidthCost(0.004, 0.0001, 1e-6, 0.001, 1e-5), "ta": WidthCost(0.006, 0.0004, 2e-6, 0.001, 1e-5)})
    s_only, ta_only = m.step_s({"s": (8, 100)}), m.step_s({"ta": (8, 100)})
    assert s_only == pytest.approx(m.decode_step_s("s", 8, 100))
    mixed = m.step_s({"s": (8, 100), "ta": (8, 100)})
    assert mixed == pytest.approx(s_only + ta_only - 0.004)
    assert m.step_s({"s": (8, 100), "ta": (0, 0)}) == pytest.approx(s_only)
    # What the profile measured a mixed step to cost over that sum scales mixed steps only.
    m.mixed_factor = 1.2
    assert m.step_s({"s": (8, 100), "ta": (8, 100)}) == pytest.approx(1.2 * mixed)
    assert m.step_s({"s": (8, 100)}) == pytest.approx(s_only)


def test_behind_a_dispatching_backend_the_policy_only_names_the_allowed_widths():
    """The engine's scheduler decides width, order and refusal: the policy predicts nothing and keeps no state."""
    policy = make_policy("slo:min_width=m", WIDTHS, PolicyContext(predictor=None, dispatch=True, shed=True))
    decisions = {policy.choose(req(slo), load(waiting), float(t)) for t, (slo, waiting) in
                 enumerate([(50, 0), (5000, 100), (None, 3)])}
    assert decisions == {WidthDecision("ta", "at_dispatch", None, candidates=("m", "l", "ta"))}
    assert policy.shed
    with pytest.raises(ValueError, match="latency predictor"):
        make_policy("slo", WIDTHS, PolicyContext(predictor=None, dispatch=False))
