"""Trainer: loss terms, parameter sharing, recipes, resume equivalence, DDP, config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from matta.checkpoint import load_checkpoint
from matta.model import NestedGPT
from tests.helpers import REPO, tiny_config
from training.config import TrainConfig, load_train_config
from training.losses import MattaWeights, cross_entropy, distill_ramp, label_loss, matta_loss, soft_kl
from training.trainer import train

V = 50


def logits(seed, shape=(2, 5, V)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def targets(seed=9):
    return torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(seed))


def test_soft_kl_is_t_squared_times_kl_of_softened_distributions():
    s, t = logits(1), logits(2)
    for T in (1.0, 2.0, 4.0):
        p = F.softmax(t / T, -1)
        manual = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T**2
        torch.testing.assert_close(soft_kl(s, t, T), manual, atol=1e-5, rtol=1e-5)
    assert soft_kl(s, s.clone(), 2.0).abs() < 1e-6


def test_label_mix_interpolates_between_ground_truth_and_teacher():
    s, t, y = logits(1), logits(2), targets()
    torch.testing.assert_close(label_loss(s, y, t, 0.0, 2.0), cross_entropy(s, y))
    torch.testing.assert_close(label_loss(s, y, t, 1.0, 2.0), soft_kl(s, t, 2.0))
    mixed = label_loss(s, y, t, 0.25, 2.0)
    torch.testing.assert_close(mixed, 0.75 * cross_entropy(s, y) + 0.25 * soft_kl(s, t, 2.0))


def _weights(**kw):
    base = dict(ta=1.0, student=1.0, distill=1.0, middle=1.0, temperature=2.0, label_mix=0.5)
    return MattaWeights(**{**base, **kw})


def _matta_parts(*args) -> dict[str, float]:
    _, parts = matta_loss(*args)
    return {k: float(v) for k, v in parts.items()}


def test_matta_terms_are_zero_or_nonzero_when_they_should_be():
    y, teacher, ta, student = targets(), logits(1), logits(2), logits(3)
    parts = _matta_parts(y, teacher, ta, student, [], _weights())
    assert parts["distill"] > 0 and parts["ta"] > 0 and parts["student"] > 0
    same = _matta_parts(y, teacher, ta, ta.clone(), [], _weights())
    assert abs(same["distill"]) < 1e-6  # a Student equal to the TA has nothing to distil
    off = _matta_parts(y, teacher, ta, student, [], _weights(distill=0.0))
    assert off["distill"] == 0.0
    assert off["total"] == pytest.approx(off["ta"] + off["student"], rel=1e-6)
    with_middle = _matta_parts(y, teacher, ta, student, [logits(4)], _weights())
    assert with_middle["middle"] > 0
    assert with_middle["total"] > parts["total"]


def test_a_tensor_beta_gives_the_same_loss_as_a_float_beta():
    # The trainer passes beta as a 0-d tensor so a compiled step never recompiles on its value.
    y, teacher, ta, student = targets(), logits(1), logits(2), logits(3)
    for beta in (0.0, 0.4, 1.0):
        as_float, _ = matta_loss(y, teacher, ta, student, [logits(4)], _weights(distill=beta))
        as_tensor, _ = matta_loss(y, teacher, ta, student, [logits(4)], _weights(distill=torch.tensor(beta)))
        torch.testing.assert_close(as_float, as_tensor)


def test_distillation_does_not_pull_the_ta_towards_the_student():
    y, teacher = targets(), logits(1)
    ta, student = logits(2).requires_grad_(), logits(3).requires_grad_()
    total, _ = matta_loss(y, teacher, ta, student, [], _weights(ta=0.0, student=0.0, distill=1.0))
    total.backward()
    assert ta.grad is None or ta.grad.abs().max() == 0
    assert student.grad.abs().max() > 0


def test_distill_ramp_is_linear_then_flat():
    assert distill_ramp(0, 2.0, 100) == 0.0
    assert distill_ramp(50, 2.0, 100) == pytest.approx(1.0)
    assert distill_ramp(500, 2.0, 100) == 2.0
    assert distill_ramp(0, 2.0, 0) == 2.0


def test_the_student_is_the_ta_s_leading_slice_and_its_gradient_stays_there():
    torch.manual_seed(0)
    model = NestedGPT(tiny_config())
    x = torch.randint(0, 320, (2, 10))
    loss = cross_entropy(model(x[:, :-1], width="s").logits, x[:, 1:])
    loss.backward()
    for block in model.h:
        mlp = block.mlp
        assert mlp.fc_weight.grad[:32].abs().sum() > 0
        assert mlp.fc_weight.grad[32:].abs().sum() == 0  # units outside the Student are untouched
        assert mlp.proj_weight.grad[32:].abs().sum() == 0
    ps = {p.data_ptr() for p in model.parameters()}
    assert len(ps) == len(list(model.parameters()))  # one set of weights; widths add no storage


def tiny_run(tmp_path: Path, corpus_dir: Path, recipe: str, **overrides) -> dict:
    cfg = {
        "recipe": recipe, "data": str(corpus_dir), "out": str(tmp_path / f"{recipe}-ckpt"),
        "run_dir": str(tmp_path / f"{recipe}-run"), "seed": 3, "steps": 8, "batch_size": 4, "seq_len": 32,
        "eval_every": 0, "save_every": 0, "log_every": 1, "final_eval": False,
        "model": {"n_ctx": 32, "d_model": 64, "n_layer": 2, "n_head": 1, "widths": {"s": 32, "m": 64, "ta": 128}},
        "loss": {"distill_ramp_steps": 4, "middle_widths": 1},
    }
    if recipe in ("matta", "kd"):
        cfg["teacher"] = {"path": str(tmp_path / "teacher-ckpt"), "train": {
            "recipe": "teacher", "data": str(corpus_dir), "out": str(tmp_path / "teacher-ckpt"),
            "run_dir": str(tmp_path / "teacher-run"), "steps": 4, "batch_size": 4, "seq_len": 32, "eval_every": 0,
            "final_eval": False, "model": {"n_ctx": 32, "d_model": 64, "n_layer": 2, "n_head": 1,
                                           "widths": {"full": 256}}}}
    if recipe in ("student", "kd"):
        cfg["model"]["widths"] = {"s": 32}
    for key, value in overrides.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", ["teacher", "student", "kd", "matta", "llama-teacher", "llama-kd"])
def test_every_recipe_trains_and_writes_a_loadable_checkpoint(tmp_path, corpus_dir, recipe):
    family = {"family": "llama", "n_head": 2, "n_kv_head": 1} if recipe.startswith("llama-") else {}
    recipe = recipe.removeprefix("llama-")
    if recipe == "teacher":
        cfg = tiny_run(tmp_path, corpus_dir, "teacher", model={"widths": {"full": 128}, **family})
    else:
        cfg = tiny_run(tmp_path, corpus_dir, recipe, model=family)
    out = train(TrainConfig.model_validate(cfg), progress=False)
    ckpt = load_checkpoint(out)
    assert ckpt.training["recipe"] == recipe and ckpt.training["steps"] == 8
    history = _history(Path(cfg["run_dir"]))
    assert len(history) == 8 and all(torch.isfinite(torch.tensor(h["loss_total"])) for h in history)
    if recipe == "matta":
        assert ckpt.training["teacher"]["kind"] == "matta"
        assert {"loss_ta", "loss_student", "loss_distill", "loss_middle"} <= set(history[-1])


# A nested Llama-family TA (GQA, q/k/v biases), taught by the tiny GPT-2 teacher: distillation is on logits.
LLAMA_MODEL = {"family": "qwen2", "n_head": 2, "n_kv_head": 1, "qkv_bias": True, "tie_embeddings": False}


@pytest.mark.parametrize("model", [{}, LLAMA_MODEL], ids=["gpt2", "qwen2"])
def test_resume_continues_the_same_loss_curve(tmp_path, corpus_dir, model):
    whole = tiny_run(tmp_path / "whole", corpus_dir, "matta", model=model)
    train(TrainConfig.model_validate(whole), progress=False)
    split = tiny_run(tmp_path / "split", corpus_dir, "matta", model=model)
    assert train(TrainConfig.model_validate(split), progress=False, stop_after=5) is None
    assert not Path(split["out"]).exists()
    train(TrainConfig.model_validate(split), resume=True, progress=False)
    a, b = _history(Path(whole["run_dir"])), _history(Path(split["run_dir"]))
    assert [h["step"] for h in b] == list(range(1, 9))
    for x, y in zip(a, b, strict=True):
        assert x["loss_total"] == pytest.approx(y["loss_total"], rel=1e-6), x["step"]
    wa, wb = load_checkpoint(whole["out"]).model.state_dict(), load_checkpoint(split["out"]).model.state_dict()
    assert load_checkpoint(whole["out"]).config.family == model.get("family", "gpt2")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


def test_resume_refuses_state_from_a_different_config(tmp_path, corpus_dir):
    cfg = tiny_run(tmp_path, corpus_dir, "student")
    train(TrainConfig.model_validate(cfg), progress=False, stop_after=3)
    changed = TrainConfig.model_validate({**cfg, "seed": 4})
    with pytest.raises(ValueError, match="different config"):
        train(changed, resume=True, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("model", [{}, LLAMA_MODEL], ids=["gpt2", "qwen2"])
def test_two_process_ddp_matches_one_process(tmp_path, corpus_dir, model):
    """torchrun --nproc_per_node=2 (gloo) sees the same global batches and losses as one process."""
    results = {}
    for nproc in (1, 2):
        cfg = tiny_run(tmp_path / f"p{nproc}", corpus_dir, "matta", steps=6, model=model)
        cfg["teacher"]["path"] = str(tmp_path / "shared-teacher")
        cfg["teacher"]["train"]["out"] = str(tmp_path / "shared-teacher")
        path = tmp_path / f"p{nproc}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        if nproc == 1:
            train(load_train_config(path), progress=False)  # also trains the shared teacher
        else:
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "cli", "train", str(path), "--no-progress"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
            assert done.returncode == 0, done.stderr[-2000:]
        results[nproc] = _history(Path(cfg["run_dir"]))
    for one, two in zip(results[1], results[2], strict=True):
        assert one["loss_total"] == pytest.approx(two["loss_total"], rel=1e-4), one["step"]
    assert load_checkpoint(tmp_path / "p2" / "matta-ckpt").training["world_size"] == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"teacher": None}, "recipe 'matta' needs a `teacher:` section"),
        ({"recipe": "distil"}, "recipe: Input should be"),
        ({"steps": 0}, "steps: Input should be greater than 0"),
        ({"seq_len": 64}, "seq_len 64 exceeds model.n_ctx 32"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"model": {"widths": {"s": 64, "ta": 32}}}, "strictly ascending"),
        ({"loss": {"label_mix": 1.5}}, "loss.label_mix: Input should be less than or equal to 1"),
        ({"optim": {"name": "sgd"}}, "optim.name"),
        ({"model": {"family": "qwen2"}}, "family 'qwen2' needs qkv_bias=True"),
        ({"model": {"family": "llama", "n_kv_head": 3}}, "n_kv_head must be a positive int dividing n_head 1"),
        ({"model": {"n_kv_head": 1}}, r"\['n_kv_head'\] apply to the Llama family only"),
    ],
)
def test_config_errors_name_the_field(tmp_path, corpus_dir, change, message):
    cfg = tiny_run(tmp_path, corpus_dir, "matta")
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    if cfg.get("teacher") is None:
        cfg.pop("teacher")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(ValueError, match=message):
        load_train_config(path)


def test_presets_validate():
    """Every training preset at the top of configs/ loads (experiments live in configs/experiments/)."""
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_train_config(path)


@pytest.mark.parametrize("optimizer", ["soap", pytest.param("shampoo", marks=pytest.mark.slow)])
def test_shampoo_family_optimizers_from_pytorch_optimizer_train(tmp_path, corpus_dir, optimizer):
    cfg = tiny_run(tmp_path, corpus_dir, "student", steps=4, optim={"name": optimizer, "lr": 1e-3})
    train(TrainConfig.model_validate(cfg), progress=False)
    history = _history(Path(cfg["run_dir"]))
    assert all(h["loss_total"] == h["loss_total"] for h in history)  # finite, not NaN
    assert history[-1]["loss_total"] < history[0]["loss_total"] + 0.5


def test_a_local_hf_gpt2_directory_can_be_the_teacher(tmp_path, corpus_dir):
    """Users with HF GPT-2 weights on disk distil from them as is (same vocabulary required)."""
    import transformers

    from training.data import TokenData

    tokenizer = TokenData(corpus_dir).tokenizer()
    hf_config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=64, n_layer=1, n_head=1,
                                        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    teacher_dir = tmp_path / "hf-teacher"
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(teacher_dir, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<|endoftext|>").save_pretrained(
        teacher_dir)
    cfg = tiny_run(tmp_path, corpus_dir, "kd", steps=3)
    cfg["teacher"] = {"path": str(teacher_dir)}
    out = train(TrainConfig.model_validate(cfg), progress=False)
    assert load_checkpoint(out).training["teacher"]["kind"] == "hf"

    other = tmp_path / "other-vocab"
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(other, safe_serialization=True)
    from matta.tokenizer import Tokenizer
    from tests.helpers import SAMPLE_TEXT

    foreign = Tokenizer.train([SAMPLE_TEXT], vocab_size=300)
    transformers.PreTrainedTokenizerFast(tokenizer_object=foreign.backend, eos_token="<|endoftext|>").save_pretrained(other)
    cfg["teacher"] = {"path": str(other)}
    with pytest.raises(ValueError, match="different vocabulary"):
        train(TrainConfig.model_validate(cfg), progress=False)


@pytest.mark.slow
def test_a_compiled_step_follows_the_eager_loss_curve(tmp_path, corpus_dir):
    """`compile: true` changes speed, not maths: same losses as eager within float tolerance."""
    eager = tiny_run(tmp_path / "eager", corpus_dir, "matta", steps=6)
    train(TrainConfig.model_validate(eager), progress=False)
    compiled = tiny_run(tmp_path / "compiled", corpus_dir, "matta", steps=6)
    compiled["teacher"] = eager["teacher"]  # the same trained teacher
    compiled["compile"] = True
    train(TrainConfig.model_validate(compiled), progress=False)
    for a, b in zip(_history(Path(eager["run_dir"])), _history(Path(compiled["run_dir"])), strict=True):
        assert a["loss_total"] == pytest.approx(b["loss_total"], rel=1e-3), a["step"]


@pytest.mark.slow
def test_sigkill_during_training_then_resume_reaches_the_same_final_loss(tmp_path, corpus_dir):
    """A real `matta train` process killed with SIGKILL after its first resume state, then
    `matta train --resume`: the same loss curve and weights as an uninterrupted run."""
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # same threads, same float sums
    whole = tiny_run(tmp_path / "whole", corpus_dir, "student", steps=120, save_every=20)
    (tmp_path / "whole.yaml").write_text(yaml.safe_dump(whole, sort_keys=False))
    subprocess.run([sys.executable, "-m", "cli", "train", str(tmp_path / "whole.yaml"), "--no-progress"],
                   env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
    killed = tiny_run(tmp_path / "killed", corpus_dir, "student", steps=120, save_every=20)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(killed, sort_keys=False))
    cmd = [sys.executable, "-m", "cli", "train", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = Path(killed["run_dir"]) / "resume" / "state.json"
    deadline = time.monotonic() + 120
    while not state.exists():
        assert proc.poll() is None, f"training ended before its first resume state: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no resume state after 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not Path(killed["out"]).exists()  # it died mid-run
    done = subprocess.run([*cmd, "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _history(Path(whole["run_dir"])), _history(Path(killed["run_dir"]))
    assert a[-1]["step"] == b[-1]["step"] == 120
    for x, y in zip(a, b, strict=True):
        assert x["loss_total"] == pytest.approx(y["loss_total"], rel=1e-6), x["step"]
    wa, wb = load_checkpoint(whole["out"]).model.state_dict(), load_checkpoint(killed["out"]).model.state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)


def test_a_chat_template_in_the_config_ships_in_the_checkpoint(tmp_path, corpus_dir):
    chatml = REPO / "serving" / "api" / "templates" / "chatml.jinja"
    cfg = tiny_run(tmp_path, corpus_dir, "student", steps=2, chat_template=str(chatml))
    ckpt = load_checkpoint(train(TrainConfig.model_validate(cfg), progress=False))
    assert ckpt.chat_template == chatml.read_text()
    with pytest.raises(ValueError, match="chat_template 'nope.jinja': no such file"):
        TrainConfig.model_validate({**cfg, "chat_template": "nope.jinja"})
