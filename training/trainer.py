"""One training harness for every recipe: teacher, matta, student, kd.

Runs on one process or under ``torchrun --nproc_per_node=N`` (DDP; gloo on CPU, nccl on
CUDA). Every rank draws the same global batch from the same seeded generator and trains on
its own slice, so N processes see exactly the batches one process would.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from matta.checkpoint import CHAT_TEMPLATE_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint, sha256_file
from matta.config import ModelConfig
from matta.llama import build_model
from matta.model import NestedDecoder
from matta.tokenizer import Tokenizer
from training.config import TeacherSpec, TrainConfig
from training.data import TokenData
from training.evaluate import LogitsFn, cloze_accuracy, perplexity, width_logits_fn
from training.losses import MattaWeights, cross_entropy, distill_ramp, label_loss, matta_loss
from training.state import load_state, save_state


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_world_size(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))


def setup_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cpu":
        # Processes share the machine's cores; oversubscribing them makes every rank slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    return info


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    return torch.device(name)


class Teacher:
    """A frozen teacher giving logits: a matta checkpoint at one width, or a local HF causal LM."""

    def __init__(self, logits_fn: LogitsFn, description: dict) -> None:
        self.logits_fn = logits_fn
        self.description = description

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.logits_fn(ids)

    @classmethod
    def load(cls, spec: TeacherSpec, tokenizer: Tokenizer, device: torch.device) -> Teacher:
        path = spec.path
        if (path / "manifest.json").is_file():
            ckpt = load_checkpoint(path, device=device)
            if ckpt.tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
                raise ValueError(f"teacher {path} uses a different tokenizer than the training data")
            for p in ckpt.model.parameters():
                p.requires_grad_(False)
            fn = width_logits_fn(ckpt.model, spec.width)
            # The teacher's own held-out eval travels with the student's provenance, so "the
            # teacher is clearly better than the TA" can be checked from the checkpoint alone.
            label = ckpt.config.width_label(spec.width)
            teacher_eval = (ckpt.training.get("eval") or {}).get("widths", {}).get(label)
            return cls(fn, {"kind": "matta", "path": str(path), "width": spec.width,
                            "params": ckpt.config.param_count(spec.width),
                            "flops_per_token": ckpt.config.flops_per_token(spec.width), "eval": teacher_eval})
        if (path / "config.json").is_file():
            from matta.hf import load_hf_causal_lm

            model = load_hf_causal_lm(path, tokenizer).to(device).eval()
            return cls(lambda ids: model(input_ids=ids).logits,
                       {"kind": "hf", "path": str(path), "params": sum(p.numel() for p in model.parameters())})
        raise ValueError(f"teacher path {path} is neither a matta checkpoint nor a HF model directory")


class RecipeLoss(nn.Module):
    """The model plus its recipe's loss in one forward, so DDP sees one forward per step."""

    def __init__(self, model: NestedDecoder, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, x, y, teacher_logits, beta: torch.Tensor,
                middle: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and its detached parts. ``beta`` (the ramped TA->Student weight) is a 0-d tensor,
        not a float, so a compiled step does not specialise and recompile on every new value."""
        recipe, spec = self.cfg.recipe, self.cfg.loss
        if recipe in ("teacher", "student"):
            loss = cross_entropy(self.model(x).logits, y)
            return loss, {"total": loss.detach()}
        if recipe == "kd":
            loss = label_loss(self.model(x).logits, y, teacher_logits, spec.label_mix, spec.temperature)
            return loss, {"total": loss.detach()}
        config = self.model.config
        ta_logits = self.model(x, width=config.full_width).logits
        student_logits = self.model(x, width=config.student_width).logits
        middle_logits = [self.model(x, width=m).logits for m in middle]
        weights = MattaWeights(
            ta=spec.ta_weight, student=spec.student_weight, distill=beta if spec.distill_weight > 0 else 0.0,
            middle=spec.middle_weight, temperature=spec.temperature, label_mix=spec.label_mix,
        )
        return matta_loss(y, teacher_logits, ta_logits, student_logits, middle_logits, weights)


class BatchSampler:
    """Random windows of the training stream from a seeded generator (resumable, rank-agnostic)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        window = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW from torch, or SOAP / Shampoo from pytorch-optimizer; no decay on biases and norms."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), fused=False)
    try:
        import pytorch_optimizer
    except ImportError as exc:
        raise ImportError(f"optimizer {o.name!r} needs `pip install pytorch-optimizer`") from exc
    if o.name == "soap":
        return pytorch_optimizer.SOAP(groups, lr=o.lr, betas=(o.beta1, o.beta2))
    # Matrix roots every step dominate a small model's step time on CPU; refresh every 20 steps.
    return pytorch_optimizer.Shampoo(groups, lr=o.lr, momentum=o.beta1, preconditioning_compute_steps=20)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def middle_width_choices(config: ModelConfig) -> list[int]:
    """Widths sampled into MatTA steps: the named ones strictly between Student and TA."""
    return [config.widths[n] for n in config.width_names[1:-1]]


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Run ``cfg`` to completion (training its teacher first when asked) and write ``cfg.out``.

    ``stop_after`` ends the run early at that step with its resume state saved (a time-sliced
    run, or a test of ``resume``) and returns None; ``resume=True`` continues it.
    """
    if cfg.teacher is not None and cfg.teacher.train is not None and not (cfg.teacher.path / "manifest.json").exists():
        teacher_cfg = cfg.teacher.train.model_copy(update={"out": cfg.teacher.path})
        train(teacher_cfg, resume=resume, progress=progress)
    device = resolve_device(cfg.device)
    info = setup_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if cfg.batch_size % info.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {info.world_size} processes")
    data = TokenData(cfg.data)
    tokenizer = data.tokenizer()
    torch.manual_seed(cfg.seed)
    if cfg.init_from is not None:
        model, init_description = init_model(cfg, tokenizer)
        model_config = model.config
        model.to(device)
    else:
        model_config = cfg.model.build(tokenizer.vocab_size, tokenizer.eos_id)
        model, init_description = build_model(model_config).to(device), None
    teacher = Teacher.load(cfg.teacher, tokenizer, device) if cfg.teacher is not None else None
    module: nn.Module = RecipeLoss(model, cfg)
    if info.world_size > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        module = torch.compile(module)
        if teacher is not None:
            teacher.logits_fn = torch.compile(teacher.logits_fn)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    sampler = BatchSampler(data.tokens("train"), cfg.seq_len, cfg.batch_size, cfg.seed)
    width_rng = random.Random(cfg.seed)
    run_dir = cfg.resolved_run_dir
    state_dir = run_dir / "resume"
    metrics_path = run_dir / "metrics.jsonl"
    start_step, tokens_seen, history = 0, 0, []
    if resume and (state_dir / "state.json").exists():
        state = load_state(state_dir)
        if state["config"] != json.loads(cfg.model_dump_json()):
            raise ValueError(f"{state_dir}: the resume state was written by a different config")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.generator.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        width_rng.setstate(_to_tuple(state["width_rng"]))
        start_step, tokens_seen, history = state["step"], state["tokens_seen"], state["history"]
        if info.is_main:
            # A killed run may have logged steps past its last saved state; they are redone now,
            # so the log restarts from the saved history instead of keeping both copies.
            metrics_path.write_text("".join(json.dumps(record) + "\n" for record in history))
    elif info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext())
    middle_choices = middle_width_choices(model_config)
    local = slice(info.rank * cfg.batch_size // info.world_size, (info.rank + 1) * cfg.batch_size // info.world_size)
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"{cfg.recipe}:{cfg.out.name}",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    started, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    module.train()
    for step in range(start_step, cfg.steps):
        x, y = sampler.next()
        x, y = x[local].to(device), y[local].to(device)
        middle = ([width_rng.choice(middle_choices) for _ in range(cfg.loss.middle_widths)]
                  if cfg.recipe == "matta" and middle_choices else [])
        with autocast:
            teacher_logits = teacher(x) if teacher is not None else None
            beta = torch.tensor(distill_ramp(step, cfg.loss.distill_weight, cfg.loss.distill_ramp_steps))
            loss, parts = module(x, y, teacher_logits, beta, middle)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += cfg.batch_size * cfg.seq_len
        window_tokens += cfg.batch_size * cfg.seq_len
        parts = {k: float(v) for k, v in parts.items()}
        if info.world_size > 1:
            parts = _all_reduce_mean(parts, device)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": step + 1, "tokens": tokens_seen, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": window_tokens / elapsed, **{f"loss_{k}": v for k, v in parts.items()}}
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                record["val_ppl"] = quick_eval(model, model_config, data, cfg, device)
                module.train()
            window_tokens, window_start = 0, time.perf_counter()  # eval time is not training throughput
            history.append(record)
            if info.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{parts['total']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        stopping = stop_after is not None and step + 1 == stop_after < cfg.steps
        periodic = cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps
        if info.is_main and (periodic or stopping):
            save_state(state_dir, {
                "config": json.loads(cfg.model_dump_json()), "step": step + 1, "tokens_seen": tokens_seen,
                "history": history, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "sampler_rng": sampler.generator.get_state(),
                "torch_rng": torch.get_rng_state(), "width_rng": list(width_rng.getstate()),
            })
        if stopping:
            bar.close()
            if info.world_size > 1:
                dist.barrier()
            return None
    bar.close()
    train_seconds = time.perf_counter() - started
    if info.is_main:
        training = {
            "recipe": cfg.recipe, "config": json.loads(cfg.model_dump_json()),
            "data": {"path": str(cfg.data), **{k: data.meta[k] for k in ("source", "tokens", "documents")}},
            "teacher": teacher.description if teacher else None, "init_from": init_description,
            "steps": cfg.steps, "tokens_seen": tokens_seen, "world_size": info.world_size,
            "train_seconds_this_run": train_seconds, "final_losses": history[-1] if history else None,
        }
        model.eval()
        if cfg.final_eval:
            training["eval"] = evaluate_widths(model, data, tokenizer, cfg.cloze_items, device=device, progress=progress)
        save_checkpoint(cfg.out, model.cpu(), tokenizer, training, chat_template=chat_template_of(cfg))
    if info.world_size > 1:
        dist.barrier()
    return cfg.out


def chat_template_of(cfg: TrainConfig) -> str | None:
    """The chat template the trained checkpoint ships: the config's file, else init_from's, else none."""
    if cfg.chat_template is not None:
        return cfg.chat_template.read_text()
    inherited = cfg.init_from / CHAT_TEMPLATE_FILE if cfg.init_from is not None else None
    return inherited.read_text() if inherited is not None and inherited.is_file() else None


def init_model(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[NestedDecoder, dict]:
    """The model ``cfg.init_from`` holds (architecture, widths and weights), and its provenance."""
    init = load_checkpoint(cfg.init_from)
    if init.tokenizer.backend.get_vocab() != tokenizer.backend.get_vocab():
        raise ValueError(f"init_from {str(cfg.init_from)!r} uses a different tokenizer than the data {str(cfg.data)!r}")
    if len(init.config.widths) < 2:
        raise ValueError(f"init_from {str(cfg.init_from)!r} has one width {init.config.widths}; recipe 'matta' needs "
                         f"a Student and a TA (run `matta elastify` on it first)")
    if cfg.seq_len > init.config.n_ctx:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds init_from's n_ctx {init.config.n_ctx}")
    return init.model.train(), {"path": str(cfg.init_from), "weights_sha256": sha256_file(cfg.init_from / WEIGHTS_FILE),
                                "recipe": init.training.get("recipe")}


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, list) else value


def _all_reduce_mean(parts: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(parts)
    values = torch.tensor([parts[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


@torch.inference_mode()
def quick_eval(model: NestedDecoder, config: ModelConfig, data: TokenData, cfg: TrainConfig, device) -> dict[str, float]:
    """Validation perplexity per named width on the first ``eval_batches`` batches (cheap, periodic)."""
    model.eval()
    tokens = data.tokens("val")
    return {name: perplexity(width_logits_fn(model, name), tokens, cfg.seq_len, batch_size=cfg.batch_size,
                             max_windows=cfg.eval_batches * cfg.batch_size, device=device)
            for name in config.width_names}


def mix_n_match_profiles(config: ModelConfig) -> dict[str, list[int]]:
    """A few per-layer width mixes between named widths (MatFormer Mix'n'Match)."""
    names = config.width_names
    if len(names) < 2 or config.n_layer < 2:
        return {}
    small, large = config.widths[names[0]], config.widths[names[-1]]
    half = config.n_layer // 2
    profiles = {
        f"mix:{names[0]}-{names[-1]}": [small] * half + [large] * (config.n_layer - half),
        f"mix:{names[-1]}-{names[0]}": [large] * half + [small] * (config.n_layer - half),
    }
    if len(names) >= 3:
        middle = config.widths[names[len(names) // 2]]
        profiles[f"mix:{names[0]}-{names[len(names) // 2]}-{names[-1]}"] = [
            (small, middle, large)[min(2, 3 * i // config.n_layer)] for i in range(config.n_layer)
        ]
    return profiles


@torch.inference_mode()
def evaluate_widths(model: NestedDecoder, data: TokenData, tokenizer: Tokenizer, cloze_items: int = 3000,
                    split: str = "test", device: str | torch.device = "cpu", mix_n_match: bool = True,
                    progress: bool = False) -> dict:
    """Test perplexity, cloze accuracy, params and FLOPs/token for every width (and mixes)."""
    model.eval()
    config = model.config
    tokens = data.tokens(split)
    items = data.cloze(split)[:cloze_items]
    specs: dict[str, list[int] | str] = {name: name for name in config.width_names}
    specs.update({name: name for name in config.profiles})
    if mix_n_match:
        specs.update(mix_n_match_profiles(config))
    results: dict[str, dict] = {}
    for label, spec in tqdm(specs.items(), desc="eval", disable=not progress):
        fn = width_logits_fn(model, spec)
        results[label] = {
            "ffn": config.widths[spec] if isinstance(spec, str) and spec in config.widths else list(config.resolve_width(spec)),
            "ppl": perplexity(fn, tokens, config.n_ctx, device=device),
            "cloze": cloze_accuracy(fn, tokenizer, items, config.n_ctx, device=device) if items else None,
            "params": config.param_count(spec),
            "flops_per_token": config.flops_per_token(spec),
        }
        if results[label]["cloze"] is not None:
            results[label]["cloze_acc"] = results[label]["cloze"]["acc"]
    return {"split": split, "widths": results}
