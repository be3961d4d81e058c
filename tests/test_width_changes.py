"""Width changes mid-generation: the scheduler's decisions (as a function, with a made-up latency
model, as tests/test_scheduler.py) and the model runner's decode on a cache built at other widths."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matta.model import NestedGPT
from router.ab_analysis import load_shards
from router.ab_log import ABLog, Exposure
from router.latency import LatencyModel
from serving.engine.scheduler import Scheduler
from serving.engine.width_changes import DWELL_TOKENS
from serving.messages import Sampling, Slo
from serving.worker.model_runner import ModelRunner
from tests.helpers import sharpen, tiny_config
from tests.test_scheduler import COSTS, SIZES, WIDTHS


def scheduler(width_changes: bool = True, max_batch: int = 8) -> Scheduler:
    # No load ceiling: these tests start a handful of 200-token rows at once, which its 2 s arrival
    # window reads as a rate past the TA's capacity (tests/test_scheduler.py tests the ceiling).
    return Scheduler(WIDTHS, SIZES, max_batch=max_batch, max_queue=64, latency=LatencyModel(dict(COSTS)), margin=1.0,
                     width_changes=width_changes, utilization=0.0)


def add(sched: Scheduler, now: float, deadline_s: float | None = None, widths=WIDTHS, budget: int = 20,
        width_changes: bool = True):
    slo = Slo(e2e_deadline=None if deadline_s is None else now + deadline_s, shed=deadline_s is not None)
    [seq] = sched.add(len(sched.waiting) + len(sched.running), [3], [budget], widths, slo, now, width_changes)
    return seq


def long_rows(sched: Scheduler, n: int = 4, **kwargs) -> list:
    """``n`` long best-effort sequences (no targets): alone, the scheduler runs them at the TA."""
    rows = [add(sched, 0.0, budget=200, **kwargs) for _ in range(n)]
    sched.schedule(0.0)
    assert all(r.running and r.width == "ta" for r in rows if len(r.widths) > 1)
    return rows


def test_a_narrowing_admits_the_waiting_request_it_was_for():
    """Four TA rows make a step 1 + 4 x 4 + 1 = 18 ms: a 20-token request with 0.2 s would end at
    0.343 s. With them at l (14 ms) at 0.267 s, at m (10 ms) at 0.191 s: they narrow two rungs, no
    further, and it is admitted; their width steps say where each changed."""
    sched = scheduler()
    rows = long_rows(sched)
    for r in rows:
        sched.update(r, 5, 0.05)
    newcomer = add(sched, 0.05, deadline_s=0.2)
    out = sched.schedule(0.05)
    assert out.admitted == [newcomer] and newcomer.width == "s"
    assert [r.width for r in rows] == ["m"] * 4
    assert sorted((seq.seq_id, a, b) for seq, a, b in out.changes) == [(r.seq_id, "ta", "m") for r in rows]
    assert all(r.steps == [("ta", 0), ("m", 5)] for r in rows)
    assert sched.changes_by_pair == {"ta->m": 4}
    assert sched.load().width_changes == {"ta->m": 4}


@pytest.mark.parametrize("how", ["server off", "request opts out", "pinned"])
def test_without_width_changes_the_same_request_is_refused_and_nothing_narrows(how):
    sched = scheduler(width_changes=how != "server off")
    rows = long_rows(sched, widths=("ta",) if how == "pinned" else WIDTHS, width_changes=how != "request opts out")
    newcomer = add(sched, 0.05, deadline_s=0.2)
    out = sched.schedule(0.05)
    assert out.shed == [newcomer] and not out.changes
    assert [r.width for r in rows] == ["ta"] * 4


def test_a_narrowing_goes_no_further_than_it_needs_nor_below_an_eighth_of_the_cache():
    """The narrowest a TA row may go is 1/8 of its FFN units; if even that cannot save the newcomer,
    nothing narrows (quality is not spent on a deadline that is lost anyway)."""
    sizes = {"s": 4, "m": 32, "l": 48, "ta": 64}  # s keeps 1/16 of the TA: out of reach
    sched = Scheduler(WIDTHS, sizes, max_batch=8, max_queue=64, latency=LatencyModel(dict(COSTS)), margin=1.0,
                      width_changes=True, utilization=0.0)
    rows = long_rows(sched)
    # At m (the floor) a step is 1 + 4 x 2 + 1 = 10 ms: 0.19 s for 19 steps and a prefill; 0.15 s is too short.
    newcomer = add(sched, 0.01, deadline_s=0.15)
    out = sched.schedule(0.01)
    assert out.shed == [newcomer] and not out.changes and [r.width for r in rows] == ["ta"] * 4


def test_a_running_promise_predicted_late_narrows_the_batch():
    """The machine slows down (steps measured twice as slow as profiled): a promised TA row with 18
    tokens to go and 0.2 s left would end at 18 x 2 x 9 ms = 0.324 s. The widest rows narrow, rung
    by rung, until it is on time: both to l (0.252 s), the other to m (0.216 s), to s (0.18 s)."""
    latency = LatencyModel(dict(COSTS))
    sched = Scheduler(WIDTHS, SIZES, max_batch=2, max_queue=8, latency=latency, margin=1.0, width_changes=True,
                      utilization=0.0)
    promised = add(sched, 0.0, deadline_s=0.2, widths=("l", "ta"))
    other = add(sched, 0.0, budget=200)
    sched.schedule(0.0)
    assert (promised.width, other.width) == ("ta", "ta")
    sched.update(promised, 2, 0.0)
    latency.observe_step({"ta": (2, 10)}, "eager", 2 * latency.profiled_step_s({"ta": (2, 10)}))
    out = sched.schedule(0.0)
    assert (promised.width, other.width) == ("l", "s")
    assert sorted((a, b) for _, a, b in out.changes) == [("ta", "l"), ("ta", "s")]


def test_hysteresis_a_narrowed_row_widens_one_rung_only_after_its_dwell():
    sched = scheduler()
    rows = long_rows(sched)
    newcomer = add(sched, 0.0, deadline_s=0.2)
    sched.schedule(0.0)
    assert [r.width for r in rows] == ["m"] * 4
    sched.remove(newcomer)
    for r in rows:
        sched.update(r, DWELL_TOKENS - 1, 0.1)
    assert not sched.schedule(0.1).changes  # the queue is empty, but the rows changed too recently
    for r in rows:
        sched.update(r, 1, 0.11)
    out = sched.schedule(0.11)
    assert sorted(b for _, a, b in out.changes) == ["l"] * 4  # one rung, not straight back to ta
    assert not sched.schedule(0.12).changes
    for r in rows:
        sched.update(r, DWELL_TOKENS, 0.2)
    assert sorted(b for _, a, b in sched.schedule(0.2).changes) == ["ta"] * 4
    assert rows[0].steps == [("ta", 0), ("m", 0), ("l", DWELL_TOKENS), ("ta", 2 * DWELL_TOKENS)]


def test_hysteresis_a_widening_needs_headroom_beyond_the_prediction():
    """A promised row dispatched at m (0.2 s for 20 tokens with 7 free slots priced as Student rows):
    16 tokens in, 4 to go. At l a step is 11 ms: 44 ms, 55 ms with the 25% headroom. At t = 0.15 s
    it would make it (0.194 s) but not with the headroom (0.205 s): it stays; at 0.14 s it widens."""
    for now, widened in ((0.15, False), (0.14, True)):
        sched = scheduler()
        seq = add(sched, 0.0, deadline_s=0.2)
        sched.schedule(0.0)
        assert seq.width == "m"
        sched.update(seq, 16, now)
        out = sched.schedule(now)
        assert (seq.width == "l") is widened and bool(out.changes) is widened


# --- the model runner: a switched sequence computes exactly what its width schedule computes ----------


_MODEL: list[NestedGPT] = []


def served_model() -> NestedGPT:
    if not _MODEL:
        torch.manual_seed(0)
        model = NestedGPT(tiny_config()).eval()
        sharpen(model)
        _MODEL.append(model)
    return _MODEL[0]


@torch.inference_mode()
def reference(model: NestedGPT, prompt: list[int], schedule: dict[int, str], tokens: int) -> tuple[list[int], list[float]]:
    """A plain greedy loop over one cache: token j (j >= 1) is sampled from a forward at the width
    ``schedule`` names for it (the last width named at or before j); token 0 from the prompt's."""
    def width_at(j: int) -> str:
        return schedule[max(k for k in schedule if k <= j)]

    out = model(torch.tensor([prompt]), width=width_at(0), use_cache=True)
    ids, logprobs = [], []
    for j in range(tokens):
        if j:
            out = model(torch.tensor([[ids[-1]]]), width=width_at(j), past_key_values=out.past_key_values,
                        use_cache=True)
        lp = torch.log_softmax(out.logits[0, -1].float(), -1)
        ids.append(int(lp.argmax()))
        logprobs.append(float(lp[ids[-1]]))
    return ids, logprobs


schedules = st.dictionaries(st.integers(1, 11), st.sampled_from(WIDTHS), max_size=3)


@settings(max_examples=25, deadline=None)
@given(schedules, st.sampled_from(WIDTHS), schedules, st.sampled_from(WIDTHS), st.integers(2, 9))
def test_a_switched_sequence_decodes_exactly_what_its_width_schedule_computes(changes, first, other_changes,
                                                                                other_first, other_prompt):
    """Two rows in one batch (different prompt lengths, so one is left-padded), each starting at its
    own width and switched at tokens k: every token and logprob is what a plain loop over one cache
    computes with that width schedule."""
    with torch.inference_mode():  # as the engine runs it
        check_switched_rows(changes, first, other_changes, other_first, other_prompt)


def check_switched_rows(changes, first, other_changes, other_first, other_prompt) -> None:
    model = served_model()
    runner = ModelRunner(model)
    sampling = Sampling(max_tokens=12, temperature=0, logprobs=0)
    prompts = {0: [5, 9, 13, 2, 7], 1: list(range(3, 3 + other_prompt))}
    schedule = {0: {0: first, **changes}, 1: {0: other_first, **other_changes}}
    sampled, _ = runner.prefill([(i, prompts[i], schedule[i][0], sampling) for i in (0, 1)])
    got = {i: ([sampled[i].token], [sampled[i].logprob[1]]) for i in (0, 1)}
    for j in range(1, 12):
        runner.set_widths({i: schedule[i][j] for i in (0, 1) if j in schedule[i]})
        for i, s in runner.decode().items():
            got[i][0].append(s.token)
            got[i][1].append(s.logprob[1])
    for i in (0, 1):
        ids, logprobs = reference(model, prompts[i], schedule[i], 12)
        assert got[i][0] == ids, (i, schedule[i])
        assert got[i][1] == pytest.approx(logprobs, abs=1e-4)


# --- the A/B log ------------------------------------------------------------------------------------

# The log's tables as written before widths were recorded.
LOG_BEFORE_WIDTHS = """
CREATE TABLE exposures (request_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, unit TEXT, assignment TEXT NOT NULL,
    arm TEXT NOT NULL, policy TEXT NOT NULL, width TEXT NOT NULL, status INTEGER NOT NULL, latency_s REAL,
    prompt_tokens INTEGER, completion_tokens INTEGER, created_unix REAL NOT NULL);
CREATE TABLE outcomes (id INTEGER PRIMARY KEY AUTOINCREMENT, experiment TEXT NOT NULL, request_id TEXT, unit TEXT,
    metric TEXT NOT NULL, value REAL NOT NULL, created_unix REAL NOT NULL);
"""


def test_the_ab_log_records_the_widths_served_and_reads_a_log_written_before_them(tmp_path):
    """An exposure keeps its width steps; a shard written before the column existed is read (widths
    None) and, opened for writing, gains the column."""
    old = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(old)) as conn, conn:
        conn.executescript(LOG_BEFORE_WIDTHS)
        conn.execute("INSERT INTO exposures VALUES ('r-old', 'exp', 'u1', 'hash', 'a', 'slo', 'ta', 200, 0.1, 3, 5, 1.0)")
    log = ABLog(tmp_path / "new.sqlite")
    log.write_sync([Exposure("r-new", "exp", "u2", "hash", "b", "slo", "ta", 200, 0.1, 3, 5, 2.0, "ta@0,m@3")])
    log.close()
    exposures, _ = load_shards([old, tmp_path / "new.sqlite"])
    assert {e["request_id"]: e["widths"] for e in exposures} == {"r-old": None, "r-new": "ta@0,m@3"}
    ABLog(old).close()  # opened for writing: the column is added, the old row kept
    assert {e["request_id"]: e["widths"] for e in load_shards([old])[0]} == {"r-old": None}
