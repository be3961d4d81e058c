"""``matta elastify``: turn a pretrained dense GPT-2 or Llama-family model into a nested (Matryoshka) checkpoint.

A dense model's FFN hidden units are in no particular order, so its leading slices are poor
sub-networks. Elastify measures how much each hidden unit matters on calibration tokens and
reorders every layer's units by importance, most important first: width m then keeps the m
units that matter most. A permutation of hidden units (rows of W_in, b_in and W_out, together;
for SwiGLU the rows of gate_proj and up_proj and the columns of down_proj)
does not change the full-width function, so the TA is the original model (logits equal to
float rounding). A short MatTA fine-tune (``init_from:`` in a training config) can follow.

Importance criteria, per layer l and hidden unit i, over calibration tokens t (h = the unit's
activation: the GELU output, or silu(gate) * up for SwiGLU; g = dL/dh of the next-token loss):

* ``activation``: mean_t |h_ti| * ||W_out[i]||, the mean size of what unit i adds to the residual.
* ``taylor``: mean_t |h_ti * g_ti|, the first-order estimate of the loss change from zeroing the
  unit on each token (Molchanov et al. 2017, per token).
* ``weight``: ||W_in[i]|| * ||W_out[i]|| (SwiGLU: ||gate[i]|| * ||up[i]|| * ||down[:, i]||), data-free.
* ``original``: the source order (what slicing the unmodified model gives).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from matta.checkpoint import load_checkpoint, save_checkpoint, sha256_file
from matta.config import ModelConfig
from matta.llama import build_model
from matta.model import NestedDecoder
from matta.tokenizer import Tokenizer
from training.data import TokenData

CRITERIA = ("activation", "taylor", "weight", "original")
DEFAULT_CRITERION = "activation"


def load_dense(path: str | Path) -> tuple[NestedDecoder, Tokenizer, dict, str | None]:
    """A dense source model: a matta checkpoint with one width, or a local HF GPT-2, Llama, Qwen2 or
    Mistral directory.

    Returns the model (full width), its tokenizer, a description of the source and its chat template
    (None when it has none).
    """
    path = Path(path)
    if (path / "manifest.json").is_file():
        ckpt = load_checkpoint(path)
        if len(ckpt.config.widths) != 1:
            raise ValueError(f"{path} is already elastic (widths {ckpt.config.widths}); elastify takes a dense "
                             f"model with one width")
        return ckpt.model, ckpt.tokenizer, {"path": str(path), "format": "matta", "name": ckpt.config.name,
                                            "weights_sha256": sha256_file(path / "model.safetensors")}, \
            ckpt.chat_template
    if (path / "config.json").is_file():
        from matta.hf import hf_as_nested

        model, tokenizer, chat_template, source_format = hf_as_nested(path)
        weights = sorted(path.glob("*.safetensors"))
        return model, tokenizer, {"path": str(path), "format": source_format, "name": path.name,
                                  "weights_sha256": sha256_file(weights[0]) if len(weights) == 1 else None}, \
            chat_template
    raise ValueError(f"{path} is neither a matta checkpoint nor a HF model directory")


def calibration_batches(tokens: np.ndarray, n_tokens: int, seq_len: int, batch_size: int = 8,
                        seed: int = 0) -> list[torch.Tensor]:
    """Random windows of ``seq_len + 1`` tokens (inputs and next-token targets), about ``n_tokens`` in all."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"need more than {seq_len + 1} calibration tokens, got {len(tokens)}")
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(tokens.astype(np.int64))
    n_windows = max(1, n_tokens // seq_len)
    starts = torch.randint(0, len(data) - seq_len - 1, (n_windows,), generator=generator).tolist()
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts])
    return list(windows.split(batch_size))


def unit_importance(model: NestedDecoder, batches: list[torch.Tensor], criterion: str) -> list[torch.Tensor]:
    """Importance of every FFN hidden unit of every layer, (ffn_dim,) per layer, larger = keep first."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown importance criterion {criterion!r}; known: {list(CRITERIA)}")
    mlps = [block.mlp for block in model.h]
    out_norms = [mlp.out_weight.detach().norm(dim=1) for mlp in mlps]
    if criterion == "original":
        # Descending scores that keep the source order under a stable sort.
        return [torch.arange(len(n), 0, -1, dtype=torch.float32) for n in out_norms]
    if criterion == "weight":
        return [mlp.unit_weight_norm() for mlp in mlps]
    totals = [torch.zeros_like(n, dtype=torch.float64) for n in out_norms]
    count = 0
    inputs: list[torch.Tensor | None] = [None] * len(mlps)
    grads: list[torch.Tensor | None] = [None] * len(mlps)

    def capture(index: int) -> Callable:
        def hook(module, args, output):
            inputs[index] = args[0].detach()
            if criterion == "taylor":
                output.register_hook(lambda g: grads.__setitem__(index, g.detach()))
        return hook

    handles = [mlp.register_forward_hook(capture(i)) for i, mlp in enumerate(mlps)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x, y = batch[:, :-1], batch[:, 1:]
            with torch.set_grad_enabled(criterion == "taylor"):
                logits = model(x).logits
                if criterion == "taylor":
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
            with torch.no_grad():
                for i, mlp in enumerate(mlps):
                    h = mlp.hidden(inputs[i], 0, mlp.out_weight.shape[0])  # (B, T, m): gelu, or silu(gate) * up
                    if criterion == "activation":
                        score = h.abs().sum((0, 1))
                    else:
                        dh = torch.matmul(grads[i], mlp.out_weight.t())  # dL/dh: (B, T, m)
                        score = (h * dh).abs().sum((0, 1))
                    totals[i] += score.double()
            count += x.numel()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    scores = [(t / count).float() for t in totals]
    if criterion == "activation":
        scores = [s * n for s, n in zip(scores, out_norms, strict=True)]
    return scores


@torch.no_grad()
def permute_ffn(model: NestedDecoder, orders: list[torch.Tensor]) -> None:
    """Reorder every layer's FFN hidden units in place: new unit j is old unit ``orders[l][j]``.

    Every per-unit parameter (W_in rows, b_in and W_out rows; SwiGLU's gate, up and down rows) moves
    together, so the full-width function is unchanged.
    """
    if len(orders) != len(model.h):
        raise ValueError(f"{len(orders)} permutations for {len(model.h)} layers")
    for layer, (block, order) in enumerate(zip(model.h, orders, strict=True)):
        mlp = block.mlp
        units = mlp.out_weight.shape[0]
        if sorted(order.tolist()) != list(range(units)):
            raise ValueError(f"layer {layer}: order is not a permutation of 0..{units - 1}")
        for param in mlp.unit_params:
            param.copy_(param[order])


def elastify_model(model: NestedDecoder, widths: dict[str, int], criterion: str, batches: list[torch.Tensor],
                   name: str | None = None) -> tuple[NestedDecoder, list[torch.Tensor]]:
    """A nested copy of the dense ``model`` with units sorted by ``criterion`` and ``widths`` named.

    Returns the new model and the per-layer orders (new position -> source unit).
    """
    ffn = model.config.ffn_dim
    if max(widths.values()) != ffn:
        raise ValueError(f"the widest width must equal the source FFN size {ffn}, got {widths}")
    config = ModelConfig(**{**model.config.to_dict(), "widths": dict(widths), "name": name or model.config.name,
                            "profiles": {}})
    nested = build_model(config)
    nested.load_state_dict(model.state_dict())
    scores = unit_importance(model, batches, criterion)
    orders = [torch.sort(s, descending=True, stable=True).indices for s in scores]
    permute_ffn(nested, orders)
    return nested.eval(), orders


def default_widths(ffn: int) -> dict[str, int]:
    """1/8, 1/4, 1/2 and all of the FFN, as s, m, l, ta."""
    return {"s": ffn // 8, "m": ffn // 4, "l": ffn // 2, "ta": ffn}


def elastify(source: str | Path, out: str | Path, data: str | Path, widths: dict[str, int] | None = None,
             criterion: str = DEFAULT_CRITERION, calibration_tokens: int = 32768, seed: int = 0,
             name: str | None = None, evaluate: bool = True, cloze_items: int = 1000,
             progress: bool = False) -> tuple[Path, dict]:
    """Elastify the dense model at ``source`` into the checkpoint ``out``; returns its path and training.json."""
    from training.trainer import evaluate_widths

    started = time.perf_counter()
    dense, tokenizer, description, chat_template = load_dense(source)
    token_data = TokenData(data)
    if token_data.tokenizer().backend.get_vocab() != tokenizer.backend.get_vocab():
        raise ValueError(f"{data} was tokenized with a different tokenizer than {source}; prepare it with "
                         f"`matta data prepare --tokenizer {source}`")
    widths = widths or default_widths(dense.config.ffn_dim)
    seq_len = min(256, dense.config.n_ctx)
    batches = calibration_batches(token_data.tokens("train"), calibration_tokens, seq_len, seed=seed)
    model, orders = elastify_model(dense, widths, criterion, batches,
                                   name=name or f"{description['name']}-elastic")
    training: dict = {
        "recipe": "elastify", "source": description,
        "importance": {"criterion": criterion, "calibration": {"split": "train", "tokens": sum(b[:, :-1].numel()
                       for b in batches), "seq_len": seq_len, "seed": seed}},
        "data": {"path": str(data), **{k: token_data.meta[k] for k in ("source", "tokens", "documents")}},
        "orders": [o.tolist() for o in orders],
        "elastify_seconds": time.perf_counter() - started,
    }
    if evaluate:
        training["eval"] = evaluate_widths(model, token_data, tokenizer, cloze_items=cloze_items, progress=progress)
    return save_checkpoint(out, model, tokenizer, training, chat_template=chat_template), training


def ppl_monotone(evaluation: dict, widths: list[str]) -> bool:
    """Whether held-out perplexity falls strictly from each named width to the next wider one."""
    ppl = [evaluation["widths"][w]["ppl"] for w in widths]
    return all(a > b for a, b in itertools.pairwise(ppl))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``matta elastify`` options."""
    parser.add_argument("source", type=Path,
                        help="a dense model: HF GPT-2 / Llama / Qwen2 / Mistral directory or matta checkpoint with one width")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument("--data", type=Path, default=Path("data/shakespeare"),
                        help="prepared corpus: calibration tokens (train split) and evaluation (test split)")
    parser.add_argument("--widths", help='JSON, e.g. \'{"s": 128, "ta": 1024}\' (default: 1/8, 1/4, 1/2, 1 of the FFN)')
    parser.add_argument("--criterion", choices=CRITERIA, default=DEFAULT_CRITERION,
                        help="hidden-unit importance (default: activation = mean|act| x ||W_out row||)")
    parser.add_argument("--calibration-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0, help="picks the calibration windows")
    parser.add_argument("--name", help="model name (default: <source name>-elastic)")
    parser.add_argument("--cloze-items", type=int, default=1000)
    parser.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation of every width")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``matta elastify``: reorder, write, print the evaluation per width."""
    widths = json.loads(args.widths) if args.widths else None
    out, training = elastify(args.source, args.out, args.data, widths=widths, criterion=args.criterion,
                             calibration_tokens=args.calibration_tokens, seed=args.seed, name=args.name,
                             evaluate=not args.no_eval, cloze_items=args.cloze_items, progress=True)
    print(f"wrote {out} (criterion {args.criterion}, {training['importance']['calibration']['tokens']} "
          f"calibration tokens, {training['elastify_seconds']:.1f} s)")
    if "eval" in training:
        print(f"{'width':<16} {'ffn':>20} {'params':>11} {'test ppl':>9} {'cloze':>6}")
        for n, r in training["eval"]["widths"].items():
            ffn = r["ffn"] if isinstance(r["ffn"], int) else "/".join(map(str, r["ffn"]))
            cloze = r.get("cloze_acc")
            print(f"{n:<16} {ffn:>20} {r['params']:>11,} {r['ppl']:>9.2f} {'-' if cloze is None else f'{cloze:.3f}':>6}")
        names = [n for n in training["eval"]["widths"] if not n.startswith("mix:")]
        if not ppl_monotone(training["eval"], names):
            print("warning: held-out ppl does not fall with width at every step; fine-tune with `init_from:`")
    return 0
