"""The model runner's KV cache of row slots: joins, leaves and width changes move a few rows, never
the batch, and every row still decodes exactly what the model computes for it alone."""

from itertools import pairwise

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matta.kv_cache import StaticKVCache
from matta.llama import NestedLlama
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


# --- chunked prefill --------------------------------------------------------------------------


def llama_model():
    """A tiny nested Llama (grouped-query attention, rotary positions), scaled up like ``sharpen``."""
    torch.manual_seed(0)
    model = NestedLlama(tiny_config(family="llama", n_kv_head=1)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(4)
    return model


MODELS = {"gpt2": lambda: sharpen(NestedGPT(tiny_config()).eval()), "llama": llama_model}


def split(length: int, cuts: list[int]) -> list[tuple[int, int]]:
    """Chunks (start, tokens) of a prompt of ``length`` tokens cut at ``cuts`` (positions in 1..length-1)."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < length}), length]
    return [(a, b - a) for a, b in pairwise(bounds)]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(MODELS)), st.lists(st.integers(1, 319), min_size=2, max_size=40),
       st.lists(st.integers(1, 39), max_size=6), st.sampled_from(WIDTHS))
def test_a_prompt_prefilled_in_chunks_scores_and_decodes_as_one_prefill_property(family, prompt, cuts, width):
    """Random chunk sizes: the prompt logprobs, the first token's logprobs and the greedy tokens after
    it equal the one-shot prefill's (fp32, 1e-5), for the GPT-2 and the Llama nested models."""
    model = MODELS[family]()
    sampling = Sampling(max_tokens=8, temperature=0.0, logprobs=3, prompt_logprobs=True)
    with torch.inference_mode():
        one_shot, _ = ModelRunner(model).prefill([(0, prompt, width, sampling)])
        runner = ModelRunner(model)
        chunks = split(len(prompt), cuts)
        for start, tokens in chunks:
            assert not runner.rows  # the row joins the batch only after its last chunk
            sampled, timings = runner.prefill_chunks([(0, prompt, width, sampling, start, tokens)])
            assert [(t[1], t[2]) for t in timings] == [(tokens, start)]
        assert len(runner.rows) == 1 and runner._cache.lengths.tolist() == [len(prompt)]
        tokens = [sampled[0].token] + [runner.decode()[0].token for _ in range(6)]
    assert runner.chunks_run == (0 if len(chunks) == 1 else len(chunks))
    expected, got = one_shot[0], sampled[0]
    assert _close(got.logprob, expected.logprob)
    assert len(got.prompt_logprobs) == len(prompt)
    for a, b in zip(got.prompt_logprobs, expected.prompt_logprobs, strict=True):
        assert _close(a, b)
    assert tokens == reference(model, prompt, [width] * 7)


def _close(a, b, tol: float = 1e-5) -> bool:
    """Two (token, logprob, top) entries equal within ``tol`` (top alternatives by id and logprob)."""
    (token_a, lp_a, top_a), (token_b, lp_b, top_b) = a, b
    if token_a != token_b or (lp_a is None) != (lp_b is None):
        return False
    if lp_a is not None and abs(lp_a - lp_b) > tol:
        return False
    return len(top_a) == len(top_b) and all(abs(x[1] - y[1]) <= tol for x, y in zip(top_a, top_b, strict=True))


def test_running_rows_decode_as_alone_while_a_prompt_prefills_in_chunks_beside_them():
    """Each iteration a decode step over the running rows, then a chunk of a long prompt (the engine's
    order): the running rows' tokens are those they make alone, and the chunked row, once joined,
    decodes as alone too."""
    torch.manual_seed(0)
    model = sharpen(NestedGPT(tiny_config()).eval())
    runner = ModelRunner(model)
    short = {0: ([5, 6, 7], "ta"), 1: ([9, 3], "s")}
    long_prompt = [int(t) for t in torch.randint(1, 319, (30,))]
    with torch.inference_mode():
        sampled, _ = runner.prefill([(i, p, w, GREEDY) for i, (p, w) in short.items()])
        tokens = {i: [sampled[i].token] for i in short}
        for start in range(0, 30, 7):  # chunks of 7, 7, 7, 7 and 2 tokens
            for seq_id, out in runner.decode().items():
                tokens[seq_id].append(out.token)
            done, _ = runner.prefill_chunks([(2, long_prompt, "m", GREEDY, start, min(7, 30 - start))])
            assert [r.seq_id for r in runner.rows if r.seq_id == 2] == ([2] if start + 7 >= 30 else [])
        tokens[2] = [done[2].token]
        for _ in range(4):
            for seq_id, out in runner.decode().items():
                tokens[seq_id].append(out.token)
    for seq_id, (prompt, width) in short.items():
        assert tokens[seq_id] == reference(model, prompt, [width] * len(tokens[seq_id])), seq_id
    assert tokens[2] == reference(model, long_prompt, ["m"] * 5)


def test_a_sequence_removed_while_prefilling_leaves_no_trace():
    torch.manual_seed(0)
    model = sharpen(NestedGPT(tiny_config()).eval())
    runner = ModelRunner(model)
    with torch.inference_mode():
        runner.prefill_chunks([(0, [4, 5, 6, 7, 8, 9], "s", GREEDY, 0, 3)])
        runner.remove({0})
        sampled, _ = runner.prefill_chunks([(0, [4, 5, 6, 7, 8, 9], "s", GREEDY, 0, 6)])  # starts afresh, whole
    assert sampled[0].token == reference(model, [4, 5, 6, 7, 8, 9], ["s"])[0]
    assert [r.seq_id for r in runner.rows] == [0]
