"""The nested GPT against references: HF GPT-2, explicit slices, full recomputation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matta.kv_cache import StaticKVCache
from matta.model import NestedGPT
from tests.helpers import tiny_config

TOL = dict(atol=1e-4, rtol=0)


def ids(config, B=2, T=20, seed=1):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def sliced_reference(model: NestedGPT, input_ids: torch.Tensor, widths) -> torch.Tensor:
    """An explicit, naive forward: each layer's FFN weights copied out at its own width."""
    x = model.wte(input_ids) + model.wpe(torch.arange(input_ids.shape[1]))
    T = input_ids.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for block, m in zip(model.h, widths, strict=True):
        h = block.ln_1(x)
        q, k, v = block.attn.c_attn(h).split(model.config.d_model, dim=2)
        B, nh, hs = x.shape[0], model.config.n_head, model.config.head_dim
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / hs**0.5
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + block.attn.c_proj(y)
        w_in = block.mlp.fc_weight[:m].clone()
        b_in = block.mlp.fc_bias[:m].clone()
        w_out = block.mlp.proj_weight[:m].clone()
        hidden = torch.nn.functional.gelu(block.ln_2(x) @ w_in.T + b_in, approximate="tanh")
        x = x + hidden @ w_out + block.mlp.proj_bias
    return model.ln_f(x) @ model.wte.weight.T


@pytest.mark.parametrize("width", ["s", "m", "l", "ta", 100, ["s", "ta", 77], [256, 32, 32]])
def test_every_width_and_mix_equals_an_explicitly_sliced_reference(model, config, width):
    x = ids(config)
    with torch.no_grad():
        got = model(x, width=width).logits
        want = sliced_reference(model, x, config.resolve_width(width))
    torch.testing.assert_close(got, want, **TOL)


def test_widths_are_views_of_one_weight_not_copies(model):
    mlp = model.h[0].mlp
    captured = {}
    original_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        captured.setdefault("fc_weight", weight)
        return original_linear(x, weight, bias)

    torch.nn.functional.linear = spy
    try:
        mlp(torch.randn(1, 3, model.config.d_model), 32)
    finally:
        torch.nn.functional.linear = original_linear
    weight = captured["fc_weight"]
    assert weight.shape == (32, model.config.d_model)
    assert weight.data_ptr() == mlp.fc_weight.data_ptr() and weight.is_contiguous()
    assert mlp.proj_weight[:32].data_ptr() == mlp.proj_weight.data_ptr() and mlp.proj_weight[:32].is_contiguous()


def test_narrower_width_ignores_units_beyond_it(model, config):
    """Changing hidden units past width m must not change the output at width m."""
    x = ids(config)
    with torch.no_grad():
        before = model(x, width="m").logits
        for block in model.h:
            block.mlp.fc_weight[64:] += 1.0
            block.mlp.proj_weight[64:] -= 1.0
        after = model(x, width="m").logits
        wider = model(x, width="l").logits
    torch.testing.assert_close(before, after, atol=0, rtol=0)
    assert (wider - before).abs().max() > 1e-2


@pytest.mark.parametrize("width", ["s", "ta", ["s", "m", "ta"]])
def test_kv_cache_incremental_decoding_equals_full_recomputation(model, config, width):
    x = ids(config, B=2, T=24)
    with torch.no_grad():
        full = model(x, width=width).logits
        out = model(x[:, :10], width=width, use_cache=True)  # prefill
        pieces = [out.logits]
        out = model(x[:, 10:17], width=width, past_key_values=out.past_key_values, use_cache=True)  # a chunk
        pieces.append(out.logits)
        for t in range(17, 24):  # then one token at a time
            out = model(x[:, t : t + 1], width=width, past_key_values=out.past_key_values, use_cache=True)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


@pytest.mark.parametrize("keep", [1, 3, 40])
def test_logits_to_keep_gives_the_last_positions_logits_and_the_same_cache(model, config, keep):
    x = ids(config, B=3, T=20)
    mask = torch.ones_like(x)
    mask[1, :6] = 0  # a left-padded row, as the engine prefills
    with torch.no_grad():
        full = model(x, width=["ta", "s", "m"], attention_mask=mask, use_cache=True)
        kept = model(x, width=["ta", "s", "m"], attention_mask=mask, use_cache=True, logits_to_keep=keep)
    assert kept.logits.shape == (3, min(keep, 20), config.vocab_size)
    torch.testing.assert_close(kept.logits, full.logits[:, -keep:], atol=1e-6, rtol=0)
    for (k_full, v_full), (k_kept, v_kept) in zip(full.past_key_values, kept.past_key_values, strict=True):
        assert torch.equal(k_full, k_kept) and torch.equal(v_full, v_kept)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_single_sequences(model, config, side):
    lengths = [5, 12, 9]
    seqs = [ids(config, B=1, T=n, seed=n)[0] for n in lengths]
    T = max(lengths)
    batch = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        batch[i, sl], mask[i, sl] = s, 1
    with torch.no_grad():
        padded = model(batch, width="m", attention_mask=mask).logits
        for i, s in enumerate(seqs):
            single = model(s[None], width="m").logits[0]
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            torch.testing.assert_close(padded[i, sl], single, **TOL)


def test_padded_batch_with_cache_continues_each_sequence_exactly(model, config):
    """Left-padded prefill then cached decode: what a batching server does."""
    a, b = ids(config, B=1, T=6, seed=3)[0], ids(config, B=1, T=11, seed=4)[0]
    batch = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    batch[0, 5:], mask[0, 5:] = a, 1
    batch[1], mask[1] = b, 1
    nxt = torch.tensor([[7], [9]])
    with torch.no_grad():
        out = model(batch, width="s", attention_mask=mask, use_cache=True)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = model(nxt, width="s", attention_mask=step_mask, past_key_values=out.past_key_values).logits
        ref_a = model(torch.cat([a, nxt[0]])[None], width="s").logits[0, -1]
        ref_b = model(torch.cat([b, nxt[1]])[None], width="s").logits[0, -1]
    torch.testing.assert_close(step[0, -1], ref_a, **TOL)
    torch.testing.assert_close(step[1, -1], ref_b, **TOL)


def test_context_overflow_and_bad_mask_are_clear_errors(model, config):
    with pytest.raises(ValueError, match="exceeds the context window 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


def test_greedy_reference_decode_matches_argmax_of_full_forward(model, config):
    prompt = [3, 17, 42, 5]
    out = model.generate_greedy(prompt, max_new_tokens=6, width="l")
    seq = list(prompt)
    for token in out:
        with torch.no_grad():
            assert token == int(model(torch.tensor([seq]), width="l").logits[0, -1].argmax())
        seq.append(token)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 256), min_size=3, max_size=3), T=st.integers(1, 12))
def test_any_per_layer_mix_matches_reference_property(widths, T):
    torch.manual_seed(0)
    m = NestedGPT(tiny_config()).eval()
    x = ids(m.config, B=1, T=T, seed=T)
    with torch.no_grad():
        torch.testing.assert_close(m(x, width=widths).logits, sliced_reference(m, x, widths), **TOL)


@pytest.mark.parametrize("capacity", [9, 64])  # 9: the buffers must grow while decoding
def test_a_preallocated_cache_decodes_exactly_like_the_concatenating_one(model, config, capacity):
    torch.manual_seed(5)
    ids = torch.randint(0, config.vocab_size, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded row
    with torch.no_grad():
        listed = model(ids, width="s", attention_mask=mask, use_cache=True)
        static = StaticKVCache.from_list(listed.past_key_values, capacity=capacity)
        cache, step = listed.past_key_values, ids[:, -1:]
        for _ in range(6):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            a = model(step, width="s", attention_mask=mask, past_key_values=cache, use_cache=True)
            b = model(step, width="s", attention_mask=mask, past_key_values=static, use_cache=True)
            assert b.past_key_values is static and static.length == mask.shape[1]
            torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
            cache, step = a.past_key_values, a.logits[:, -1:].argmax(-1)
    assert static.capacity >= 14
    for (k, v), (ks, vs) in zip(cache, static.as_list(), strict=True):
        torch.testing.assert_close(k, ks)
        torch.testing.assert_close(v, vs)


WIDTH_SPECS = st.one_of(st.sampled_from(["s", "m", "l", "ta"]), st.integers(1, 256),
                        st.lists(st.integers(1, 256), min_size=3, max_size=3))


@settings(max_examples=40, deadline=None)
@given(row_widths=st.lists(WIDTH_SPECS, min_size=1, max_size=6), T=st.integers(1, 8), decode_steps=st.integers(0, 3),
       pad=st.lists(st.integers(0, 3), min_size=6, max_size=6), sort=st.booleans())
def test_one_forward_over_mixed_widths_equals_each_row_alone_property(row_widths, T, decode_steps, pad, sort):
    """The mixed-width forward (shared attention, norms, embeddings and LM head; FFN by blocks of
    hidden units) gives every row what it gets alone at its width, per-layer mixes included, with
    left padding and through decode steps on a preallocated cache (fp32, <= 1e-5)."""
    torch.manual_seed(0)
    m = NestedGPT(tiny_config()).eval()
    config = m.config
    if sort:  # widest first: the engine's order, where blocks run on row prefixes
        row_widths = sorted(row_widths, key=lambda w: config.resolve_width(w), reverse=True)
    B = len(row_widths)
    x = ids(config, B=B, T=T, seed=T + B)
    mask = torch.ones(B, T, dtype=torch.long)
    for i in range(B):
        mask[i, : min(pad[i], T - 1)] = 0  # left padding, at least one real token
    steps = ids(config, B=B, T=decode_steps, seed=7) if decode_steps else None
    with torch.no_grad():
        mixed = m(x, row_widths=row_widths, attention_mask=mask, use_cache=True)
        cache = StaticKVCache.from_list(mixed.past_key_values, T + decode_steps)
        mixed_logits, step_mask = [mixed.logits[:, -1]], mask
        for t in range(decode_steps):
            step_mask = torch.cat([step_mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
            out = m(steps[:, t : t + 1], row_widths=row_widths, attention_mask=step_mask, past_key_values=cache,
                    use_cache=True)
            mixed_logits.append(out.logits[:, -1])
        for i, width in enumerate(row_widths):
            real = mask[i].bool()
            alone = m(x[i : i + 1, real], width=width, use_cache=True)
            torch.testing.assert_close(mixed.logits[i, real], alone.logits[0], atol=1e-5, rtol=0)
            past = alone.past_key_values
            for t in range(decode_steps):
                alone = m(steps[i : i + 1, t : t + 1], width=width, past_key_values=past, use_cache=True)
                torch.testing.assert_close(mixed_logits[t + 1][i], alone.logits[0, -1], atol=1e-5, rtol=0)
                past = alone.past_key_values


def test_mixed_widths_are_refused_with_a_clear_error_when_they_do_not_fit(model, config):
    x = ids(config, B=2, T=4)
    with pytest.raises(ValueError, match="row_widths has 1 entries; the batch has 2 rows"):
        model(x, row_widths=["s"])
    with pytest.raises(ValueError, match="give one of"):
        model(x, width="s", row_widths=["s", "ta"])
    with pytest.raises(ValueError, match="plans has 1 entries; the model has"):
        model(x, plans=[16])
    with pytest.raises(ValueError, match="unknown width"):
        model(x, row_widths=["s", "xl"])


def test_bfloat16_weights_and_cache_track_float32_and_logits_leave_in_float32(model, config):
    """In bf16 the weights and the KV cache halve their bytes; softmax and logits stay float32, so
    the bf16 model is the fp32 one within bf16's rounding (8 bits of mantissa, per layer)."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    x = ids(config, B=2, T=24)
    with torch.no_grad():
        for width in ("s", "ta", ["s", "m", "ta"]):
            want = model(x, width=width).logits
            full = half(x, width=width).logits
            assert full.dtype == torch.float32
            assert float((full - want).abs().max() / want.abs().max()) < 0.05, width
        cache = StaticKVCache.from_list(half(x[:, :10], width="ta", use_cache=True).past_key_values, capacity=32)
        assert cache.keys[0].dtype == torch.bfloat16
        steps = [half(x[:, t : t + 1], width="ta", past_key_values=cache, use_cache=True).logits for t in range(10, 24)]
    # Decoding on the bf16 cache is the bf16 model's full forward, up to bf16's rounding.
    with torch.no_grad():
        full = half(x, width="ta").logits[:, 10:]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=0.05, rtol=0.02)
