"""The model runner's KV cache of row slots: joins, leaves and width changes move a few rows, never
the batch, and every row still decodes exactly what the model computes for it alone."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matta.kv_cache import StaticKVCache
from matta.model import NestedGPT
from serving.messages import Sampling
from serving.worker.model_runner import ModelRunner
from tests.helpers import sharpen, tiny_config

WIDTHS = ["s", "m", "l", "ta"]
GREEDY = Sampling(max_tokens=64, temperature=0.0)


def reference(model, prompt: list[int], schedule: list[str]) -> list[int]:
    """Greedy tokens of one sequence alone, width ``schedule[t]`` for the forward that makes token t
    (a list cache, no padding, no batch)."""
    out = model(torch.tensor([prompt]), width=schedule[0], use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for width in schedule[1:]:
        out = model(torch.tensor([[tokens[-1]]]), width=width, past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


PROMPT = st.lists(st.integers(1, 319), min_size=1, max_size=9)
EVENT = st.one_of(  # a join admits one to three sequences in one prefill (mixed lengths and widths)
    st.tuples(st.just("join"), st.lists(st.tuples(PROMPT, st.sampled_from(WIDTHS)), min_size=1, max_size=3)),
    st.tuples(st.just("leave"), st.integers(0, 99)),
    st.tuples(st.just("width"), st.integers(0, 99), st.sampled_from(WIDTHS)),
    st.tuples(st.just("step")),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(EVENT, min_size=1, max_size=24))
def test_rows_decode_as_alone_through_joins_leaves_and_width_changes_property(events):
    torch.manual_seed(0)
    model = sharpen(NestedGPT(tiny_config()).eval())
    runner = ModelRunner(model)
    prompts, schedules, tokens = {}, {}, {}
    next_id = 0
    with torch.inference_mode():
        for event in events + [("step",)] * 2:
            live = [r.seq_id for r in runner.rows]
            if event[0] == "join" and len(live) < 8:
                seqs = [(next_id + j, prompt, width, GREEDY) for j, (prompt, width) in enumerate(event[1])]
                sampled, _ = runner.prefill(seqs)
                for seq_id, prompt, width, _ in seqs:
                    prompts[seq_id], schedules[seq_id], tokens[seq_id] = prompt, [width], [sampled[seq_id].token]
                next_id += len(seqs)
            elif event[0] == "leave" and live:
                runner.remove({live[event[1] % len(live)]})
            elif event[0] == "width" and live:
                runner.set_widths({live[event[1] % len(live)]: event[2]})
            elif event[0] == "step" and live and runner.context < model.config.n_ctx - 1:
                for row in runner.rows:
                    schedules[row.seq_id].append(row.width)
                for seq_id, out in runner.decode().items():
                    tokens[seq_id].append(out.token)
            sizes = [sum(model.config.resolve_width(r.width)) for r in runner.rows]
            assert sizes == sorted(sizes, reverse=True)  # grouped widest first, for prefix FFN plans
            if runner.rows:
                lengths = runner._cache.lengths.tolist()
                want = [len(prompts[r.seq_id]) + len(tokens[r.seq_id]) - 1 for r in runner.rows]
                assert lengths == want
    for seq_id, prompt in prompts.items():
        assert tokens[seq_id] == reference(model, prompt, schedules[seq_id]), seq_id


def test_a_leave_moves_one_row_per_narrower_group_not_the_batch(monkeypatch):
    """Sixteen rows of two widths: a Student leaving moves one row; a TA leaving, two; a row
    changing width, a handful; never the batch."""
    torch.manual_seed(0)
    model = sharpen(NestedGPT(tiny_config()).eval())
    runner = ModelRunner(model)
    moved = []
    move_row = StaticKVCache.move_row

    def counting(cache, source, target):
        moved.append((source, target))
        move_row(cache, source, target)

    with torch.inference_mode():
        runner.prefill([(i, [5 + i, 6, 7], "ta" if i < 8 else "s", GREEDY) for i in range(16)])
        runner.decode()
        monkeypatch.setattr(StaticKVCache, "move_row", counting)
        runner.remove({9})  # a Student in the middle of its group: the group's last fills its slot
        assert len(moved) == 1
        moved.clear()
        runner.remove({2})  # a TA: its group's last TA, then the last Student, move
        assert len(moved) == 2
        moved.clear()
        runner.set_widths({12: "ta"})  # park, leave (1 move), back to the end, join (park, 1 move, unpark)
        assert len(moved) <= 6
    assert [r.seq_id for r in runner.rows].count(2) == 0 and len(runner.rows) == 14
    assert [r.width for r in runner.rows] == ["ta"] * 8 + ["s"] * 6
