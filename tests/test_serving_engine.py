"""The continuous-batching engine against the model itself: no HTTP, a real tiny model."""

import asyncio
import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from router.latency import LatencyModel, WidthCost
from serving.engine.core import EngineCore
from serving.engine.detokenize import IncrementalDetokenizer
from serving.engine.inproc import Engine, EngineStoppedError
from serving.messages import Add, Sampling, Slo
from tests.helpers import assert_greedy_up_to_rounding, sharpen

GREEDY = Sampling(max_tokens=12, temperature=0.0)
BF16_LOGIT_TOLERANCE = 0.05  # about 6 bf16 ulps at this tiny model's logits (|logit| < 2); measured gaps <= 0.008


@pytest.fixture
def model(model):
    return sharpen(model)


@pytest.fixture(params=[0, 8], ids=["unchunked", "chunked"])
def engine(model, tokenizer, request):
    """The engine unchunked, and with chunked prefill at the smallest budget its batch allows (8 tokens
    an iteration: every prompt longer than what the decoding rows leave spans iterations)."""
    e = Engine(model, tokenizer, max_batch=8, max_queue=16, max_num_batched_tokens=request.param)
    e.start()
    yield e
    e.stop()


async def collect(stream):
    """Token ids, text and final event of every sequence of a request stream."""
    out = {}
    async for index, event in stream:
        tokens, text, _ = out.get(index, ([], "", None))
        out[index] = (tokens + event.token_ids, text + event.text, event if event.finish_reason else None)
    return [out[i] for i in sorted(out)]


def run_request(engine, prompts, width, params, slo=None):
    """Submit from inside an event loop (as the HTTP server does) and collect everything."""

    async def main():
        return await collect(engine.submit(prompts, width, params, *(() if slo is None else (slo,))))

    return asyncio.run(main())


def test_greedy_with_joins_and_leaves_equals_the_model_alone(engine, model, tokenizer):
    prompts = [("Now is the winter", "s", 12), ("To be, or not to be", "ta", 5),
               ("Friends, Romans", "s", 9), ("and all the clouds", "m", 12), ("the slings", "s", 1)]

    async def main():
        first = engine.submit([tokenizer.encode(prompts[0][0])], "s", GREEDY)
        got = []
        # Let the first sequence decode a few steps so the others join a running batch mid-way.
        for _ in range(3):
            got.append(await first.__anext__())
        rest = [engine.submit([tokenizer.encode(p)], w, Sampling(max_tokens=n, temperature=0.0))
                for p, w, n in prompts[1:]]
        results = await asyncio.gather(collect(first), *(collect(s) for s in rest))
        head = [t for _, e in got for t in e.token_ids]
        return [head + results[0][0][0]] + [r[0][0] for r in results[1:]]

    outputs = asyncio.run(main())
    for (text, width, n), tokens in zip(prompts, outputs, strict=True):
        assert tokens == model.generate_greedy(tokenizer.encode(text), n, width=width), (text, width)
    assert engine.stats().running == 0


def test_seeded_sampling_is_reproducible_alone_or_batched(engine, tokenizer):
    params = Sampling(max_tokens=10, temperature=0.9, top_p=0.9, seed=1234)
    ids = tokenizer.encode("Now is the winter")

    async def alone():
        return (await collect(engine.submit([ids], "m", params)))[0][0]

    async def crowded():
        others = [engine.submit([tokenizer.encode("To be")], "m", Sampling(max_tokens=10, seed=i))
                  for i in range(5)]
        mine = engine.submit([ids], "m", params)
        results = await asyncio.gather(collect(mine), *(collect(o) for o in others))
        return results[0][0][0]

    first = asyncio.run(alone())
    assert asyncio.run(crowded()) == first
    other_seed = Sampling(max_tokens=10, temperature=0.9, top_p=0.9, seed=99)
    assert run_request(engine, [ids], "m", other_seed)[0][0] != first


@pytest.mark.parametrize("extreme", [{"top_p": 5e-324}, {"top_p": 1e-9}, {"temperature": 5e-324},
                                     {"temperature": 1e-7, "top_p": 5e-324}])
def test_extreme_sampling_values_decode_like_greedy_and_fail_nothing(engine, tokenizer, extreme):
    """Found by schemathesis: top_p below float32's resolution emptied the nucleus and a tiny
    temperature overflowed the logits, so the step failed and every sequence in the batch with it."""
    ids = tokenizer.encode("Now is the winter")
    greedy = run_request(engine, [ids], "m", GREEDY)[0][0]

    async def extreme_beside_another():
        bystander = engine.submit([ids], "s", GREEDY)
        mine = engine.submit([ids], "m", Sampling(max_tokens=12, seed=3, **{"temperature": 1.0, **extreme}))
        return await asyncio.gather(collect(mine), collect(bystander))

    mine, bystander = asyncio.run(extreme_beside_another())
    assert mine[0][0] == greedy and mine[0][2].finish_reason == "length"
    assert bystander[0][2].finish_reason == "length"


def test_a_queued_sequence_past_its_deadline_is_shed_and_never_started(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_queue=8)  # no latency model: only a passed deadline
    engine.start()
    try:
        ids = tokenizer.encode("Now is the winter")
        four = Sampling(max_tokens=4, temperature=0)

        async def main():
            running = engine.submit([ids], "ta", Sampling(max_tokens=60, temperature=0))
            first = await running.__anext__()  # it holds the one batch slot now
            hopeless = engine.submit([ids], "ta", four, Slo(e2e_deadline=time.monotonic() + 0.001, shed=True))
            best_effort = engine.submit([ids], "ta", four, Slo(e2e_deadline=time.monotonic() + 0.001))
            patient = engine.submit([ids], "ta", four)
            rest = await asyncio.gather(collect(running), collect(hopeless), collect(best_effort), collect(patient))
            return first, *rest

        first, running, hopeless, best_effort, patient = asyncio.run(main())
        assert hopeless[0][2].finish_reason == "shed" and hopeless[0][0] == []
        assert [r[0][2].finish_reason for r in (running, best_effort, patient)] == ["length"] * 3
        assert first[1].finish_reason is None
        alone = run_request(engine, [ids], "ta", four, Slo(e2e_deadline=time.monotonic() + 5, shed=True))
        assert alone[0][2].finish_reason == "length"
        assert engine.stats().running == 0 and engine.stats().waiting == 0
    finally:
        engine.stop()


def test_stop_string_truncates_and_is_never_streamed(engine, model, tokenizer):
    ids = tokenizer.encode("Now is the winter")
    full = tokenizer.decode(model.generate_greedy(ids, 30, width="l"))
    # A two-character stop string whose first occurrence is a few characters in.
    k = next(i for i in range(2, len(full) - 2) if full.find(full[i:i + 2]) == i and full[i:i + 2].strip())
    stop = full[k:k + 2]

    async def main():
        stream = engine.submit([ids], "l", Sampling(max_tokens=30, temperature=0.0, stop=(stop,)))
        pieces, final = [], None
        async for _, event in stream:
            pieces.append(event.text)
            final = event
        return pieces, final

    pieces, final = asyncio.run(main())
    assert "".join(pieces) == full[:k]
    assert final.finish_reason == "stop"


def test_prompt_logprobs_equal_the_model_log_softmax(engine, model, tokenizer):
    ids = tokenizer.encode("To be, or not to be, that is the question")
    params = Sampling(max_tokens=0, temperature=0.0, logprobs=3, prompt_logprobs=True)
    [(tokens, text, final)] = run_request(engine, [ids], "s", params)
    assert tokens == [] and text == "" and final.finish_reason == "length"
    want = torch.log_softmax(model(torch.tensor([ids]), width="s").logits[0], dim=-1)
    lps = final.prompt_logprobs
    assert [token for token, _, _ in lps] == ids and lps[0][1] is None
    got = torch.tensor([logprob for _, logprob, _ in lps[1:]])
    torch.testing.assert_close(got, want[torch.arange(len(ids) - 1), ids[1:]], atol=1e-4, rtol=0)
    assert [t for t, _ in lps[1][2]] == want[0].topk(3).indices.tolist()


def test_generation_stops_at_the_context_window(engine, model, tokenizer, config):
    for length in (config.n_ctx - 3, config.n_ctx):
        ids = [random.Random(length).randrange(1, config.vocab_size) for _ in range(length)]
        params = Sampling(max_tokens=10, temperature=0.0)
        [(tokens, _, final)] = run_request(engine, [ids], "ta", params)
        assert tokens == model.generate_greedy(ids, 10, width="ta")
        assert final.finish_reason == "length" or tokens[-1] == config.eos_token_id
    with pytest.raises(ValueError, match="context window"):
        run_request(engine, [[1] * (config.n_ctx + 1)], "s", GREEDY)


def test_a_full_queue_refuses_and_a_cancelled_waiter_frees_its_place_at_once(model, tokenizer):
    core = EngineCore(model, tokenizer, max_batch=1, max_queue=2)  # no iteration runs: nothing leaves the queue

    def add(request_id, prompts, width):
        return [o.finish_reason for o in core.add(Add(request_id, prompts, (width,), GREEDY))]

    assert add(0, [[5, 6]], "s") == [] and add(1, [[7]], "ta") == []
    assert add(2, [[8]], "s") == ["queue_full"]
    assert add(3, [[8], [9]], "s") == ["queue_full"] * 2  # all or none: a 2-prompt request needs 2 places
    core.cancel(0)
    load = core.load()
    assert (load.waiting, load.waiting_by_width["s"], load.cancelled) == (1, 0, 1)
    assert add(4, [[8]], "s") == []


def test_cancelling_a_running_sequence_frees_its_slot(engine, tokenizer):
    async def main():
        stream = engine.submit([tokenizer.encode("Now")], "ta", Sampling(max_tokens=60, temperature=0.0))
        await stream.__anext__()
        assert engine.stats().running == 1
        stream.cancel()
        deadline = time.monotonic() + 2
        while engine.stats().running and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return engine.stats()

    stats = asyncio.run(main())
    assert (stats.running, stats.cancelled, stats.finished) == (0, 1, 0)


def test_stopping_aborts_what_is_left_and_refuses_new_work(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_queue=4)

    async def main():
        stream = engine.submit([[5, 6], [7]], "s", Sampling(max_tokens=50, temperature=0.0))
        engine.start()
        engine.stop()
        results = await collect(stream)
        with pytest.raises(EngineStoppedError):
            engine.submit([[1]], "s", GREEDY)
        return results

    results = asyncio.run(main())
    assert [final.finish_reason for _, _, final in results] in (["abort", "abort"], ["length", "abort"],
                                                                 ["abort", "length"], ["length", "length"])
    assert engine.stats().running == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 319), min_size=1, max_size=24))
def test_incremental_detokenizer_equals_decoding_everything(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == tokenizer.decode(ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_same_engine_code_runs_on_cuda(model, tokenizer):
    model = model.to("cuda")
    engine = Engine(model, tokenizer, max_batch=8, max_queue=16)
    engine.start()
    try:
        cases = [("Now is the winter", "s"), ("To be, or not to be", "m"), ("Friends, Romans", "ta")]

        async def main():
            streams = [engine.submit([tokenizer.encode(p)], w, GREEDY) for p, w in cases]
            seeded = Sampling(max_tokens=8, temperature=0.7, seed=3, logprobs=2, prompt_logprobs=True)
            sampled = [engine.submit([tokenizer.encode(cases[0][0])], "l", seeded) for _ in range(2)]
            return await asyncio.gather(*(collect(s) for s in streams + sampled))

        results = asyncio.run(main())
        for (p, w), [(tokens, _, _)] in zip(cases, results[:3], strict=True):
            assert tokens == model.generate_greedy(tokenizer.encode(p), GREEDY.max_tokens, width=w)
        assert results[3][0][0] == results[4][0][0]
        ids = tokenizer.encode(cases[0][0])
        want = torch.log_softmax(model(torch.tensor([ids], device="cuda"), width="l").logits[0], dim=-1)
        got = torch.tensor([e.logprob for e in results[3][0][2].prompt_logprobs[1:]])
        torch.testing.assert_close(got, want[torch.arange(len(ids) - 1), ids[1:]].cpu(), atol=1e-4, rtol=0)
    finally:
        engine.stop()


def test_mixed_widths_share_one_forward_per_step_and_decode_as_alone(model, tokenizer):
    """A batch of four widths takes one decode forward per step, and every row decodes as it would alone."""
    engine = Engine(model, tokenizer, max_batch=8, max_queue=16)
    prompts = [("Now is the winter", "ta"), ("To be, or not to be", "s"), ("Friends, Romans", "l"),
               ("and all the clouds", "m"), ("the slings and arrows", "s")]
    n = 20

    async def main():
        streams = [engine.submit([tokenizer.encode(p)], w, Sampling(max_tokens=n, temperature=0.0))
                   for p, w in prompts]
        engine.start()  # every sequence is queued before the first step: they run together
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        outputs = asyncio.run(main())
        steps = engine.stats().steps
    finally:
        engine.stop()
    for (text, width), result in zip(prompts, outputs, strict=True):
        assert result[0][0] == model.generate_greedy(tokenizer.encode(text), n, width=width), (text, width)
    # n - 1 decode steps after the prefill's token (fewer for a row that ends early).
    assert steps <= n - 1, steps


def test_batched_sampling_draws_from_the_tempered_nucleus_of_each_row():
    """sample_rows: one call for the whole batch; each row's empirical distribution is its own
    softmax(logits / T) renormalised over its top-p nucleus, and a seeded row ignores its batch."""
    from serving.worker.sampling import sample_rows

    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    n = 40_000
    params = [Sampling(temperature=0.7), Sampling(temperature=1.3, top_p=0.8)] * (n // 2)
    draws = sample_rows(logits.repeat(n, 1), params, [None] * n)
    for row, (t, top_p) in enumerate([(0.7, 1.0), (1.3, 0.8)]):
        p = torch.softmax(logits / t, dim=-1)
        keep = (p.cumsum(0) - p) < top_p  # sorted already: logits descend
        expected = torch.where(keep, p, 0) / p[keep].sum()
        observed = torch.bincount(draws[row::2], minlength=5).float() / (n // 2)
        torch.testing.assert_close(observed, expected, atol=0.01, rtol=0)
    alone = sample_rows(logits[None], [Sampling(temperature=1.0)], [torch.Generator().manual_seed(3)])
    crowd = sample_rows(logits.repeat(4, 1), [Sampling(temperature=1.0)] * 4,
                        [None, torch.Generator().manual_seed(3), None, None])
    assert int(alone[0]) == int(crowd[1])


def test_a_plain_answer_comes_as_its_first_token_and_one_final_output_with_the_same_text(engine, tokenizer):
    """Not streamed: two outputs per sequence (the first names the width), holding exactly the tokens,
    text and logprobs the streamed outputs hold, stop strings included."""
    ids = tokenizer.encode("Now is the winter")
    params = Sampling(max_tokens=20, temperature=0.0, logprobs=2)

    async def outputs(stream: bool):
        return [o async for _, o in engine.submit([ids], "m", params, stream=stream)]

    async def main():
        return await outputs(True), await outputs(False)

    streamed, plain = asyncio.run(main())
    assert len(streamed) == 20 and len(plain) == 2 and plain[0].width == "m"
    for key in ("token_ids", "logprobs"):
        assert [x for o in plain for x in getattr(o, key)] == [x for o in streamed for x in getattr(o, key)]
    assert "".join(o.text for o in plain) == "".join(o.text for o in streamed)
    assert plain[-1].finish_reason == streamed[-1].finish_reason == "length"


def test_a_bfloat16_engine_decodes_mixed_widths_as_the_bfloat16_model_alone(model, tokenizer):
    """``--dtype bfloat16``: weights and KV cache in bf16; batched, mixed-width decoding gives each
    row the bf16 model's own greedy tokens at its width, up to bf16 rounding: a CPU without native
    bf16 matmuls rounds a batch of rows differently from one row, and a near-tie may then break the
    other way (exact text equality held on AVX-512 BF16 and failed on AVX2)."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    engine = Engine(half, tokenizer, max_batch=8, max_queue=16)
    prompts = [("Now is the winter", "ta"), ("To be, or not to be", "s"), ("Friends, Romans", "l"),
               ("the slings and arrows", "s")]

    async def main():
        streams = [engine.submit([tokenizer.encode(p)], w, Sampling(max_tokens=16, temperature=0.0))
                   for p, w in prompts]
        engine.start()
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        outputs = asyncio.run(main())
    finally:
        engine.stop()
    for (text, width), result in zip(prompts, outputs, strict=True):
        assert len(result[0][0]) == 16 or result[0][0][-1] == model.config.eos_token_id
        assert_greedy_up_to_rounding(half, tokenizer.encode(text), result[0][0], width, BF16_LOGIT_TOLERANCE)


def test_with_chunked_prefill_a_long_prompt_never_stalls_a_running_answer(model, tokenizer):
    """The core loop, an iteration at a time, with 10 tokens an iteration: a running answer gets a
    token in every iteration while a 45-token prompt prefills beside it, 9 tokens a chunk (the decode
    step took one), so the prompt's first token comes in the 5th iteration; both answers are the
    model's alone."""
    core = EngineCore(model, tokenizer, max_batch=4, max_num_batched_tokens=10)
    running = tokenizer.encode("Now is the winter")
    long_prompt = [random.Random(7).randrange(1, model.config.vocab_size) for _ in range(45)]
    tokens = {0: [], 1: []}
    with torch.inference_mode():
        assert core.add(Add(0, [running], ("s",), Sampling(max_tokens=30, temperature=0.0))) == []
        for out in core.step() + core.step():
            tokens[out.request_id] += out.token_ids
        assert core.add(Add(1, [long_prompt], ("ta",), Sampling(max_tokens=15, temperature=0.0))) == []
        for iteration in range(1, 6):
            outs = core.step()
            assert [o.request_id for o in outs if o.token_ids] == ([0, 1] if iteration == 5 else [0]), iteration
            assert core.load().prefilling == (0 if iteration == 5 else 1)
            for out in outs:
                tokens[out.request_id] += out.token_ids
        while core.has_work():
            for out in core.step():
                tokens[out.request_id] += out.token_ids
    assert core.load().prefill_chunks == 5
    assert tokens[0] == model.generate_greedy(running, 30, width="s")
    assert tokens[1] == model.generate_greedy(long_prompt, 15, width="ta")


@pytest.mark.parametrize("budget", [0, 16], ids=["unchunked", "chunked"])
def test_calibration_measures_every_batch_bucket_and_leaves_the_engine_as_it_found_it(model, tokenizer, budget):
    """Before serving, the core runs every batch-size bucket it can reach through its own loop: each
    bucket's correction is measured (none borrowed), and afterwards nothing of it is left: no row,
    no queued sequence, no iteration or finished request counted, and a request decodes as the model
    alone."""
    latency = LatencyModel({w: WidthCost(1e-3, 1e-4, 0.0, 1e-3, 1e-5) for w in model.config.served_widths})
    core = EngineCore(model, tokenizer, max_batch=8, latency=latency, max_num_batched_tokens=budget)
    assert not [k for k in latency.corrections() if k.count(":") == 3]  # nothing measured yet
    with torch.inference_mode():
        assert core.calibrate() > 0
        measured = {k for k in latency.corrections() if k.startswith("step:eager:b")}
        classes = [*model.config.served_widths, "mixed"]  # one row is never of several widths
        assert measured == {f"step:eager:b{b}:{c}" for b in (1, 2, 4, 8) for c in classes} - {"step:eager:b1:mixed"}
        assert all(latency.corrections()[f"prefill:{w}"] != 1.0 for w in model.config.served_widths)
        load = core.load()
        assert (load.running, load.waiting, load.iterations, load.finished, load.overruns_2x) == (0, 0, 0, 0, 0)
        assert core.runner.row_ids == [] and not core.has_work()
        prompt = tokenizer.encode("Now is the winter")
        tokens = core.add(Add(0, [prompt], ("m",), GREEDY))
        while core.has_work():
            tokens += core.step()
    assert [t for out in tokens for t in out.token_ids] == model.generate_greedy(prompt, 12, width="m")
    assert core.load().finished == 1
