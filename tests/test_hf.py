"""HF interop: exports load as plain GPT-2 and match the elastic model; GPT-2 imports as a TA."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from matta.checkpoint import load_checkpoint
from matta.hf import export_width, import_hf

TOL = dict(atol=1e-4, rtol=0)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def exports(checkpoint_dir, tmp_path):
    ckpt = load_checkpoint(checkpoint_dir)
    return ckpt, {w: export_width(ckpt, w, tmp_path / f"export-{w}") for w in ckpt.config.width_names}


def test_every_width_export_loads_as_gpt2_with_equal_logits(exports):
    ckpt, dirs = exports
    x = torch.randint(0, ckpt.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    for width, path in dirs.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        assert type(hf).__name__ == "GPT2LMHeadModel"
        assert hf.config.n_inner == ckpt.config.widths[width]
        assert hf.config.eos_token_id == ckpt.config.eos_token_id < hf.config.vocab_size
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, ckpt.model(x, width=width).logits, **TOL)


def test_export_tokenizer_loads_with_autotokenizer_and_matches(exports, tokenizer):
    ckpt, dirs = exports
    hf_tok = transformers.AutoTokenizer.from_pretrained(dirs["s"], local_files_only=True)
    text = "Friends, Romans, countrymen"
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == ckpt.config.eos_token_id


def test_exports_hold_no_pickle_and_nest(exports):
    ckpt, dirs = exports
    for path in dirs.values():
        assert not list(path.glob("*.bin")) and not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))
    small, large = load_file(str(dirs["s"] / "model.safetensors")), load_file(str(dirs["ta"] / "model.safetensors"))
    m = ckpt.config.widths["s"]
    assert small.keys() == large.keys()
    for name, tensor in small.items():
        if name.endswith("mlp.c_fc.weight"):
            torch.testing.assert_close(tensor, large[name][:, :m], atol=0, rtol=0)
        elif name.endswith("mlp.c_fc.bias"):
            torch.testing.assert_close(tensor, large[name][:m], atol=0, rtol=0)
        elif name.endswith("mlp.c_proj.weight"):
            torch.testing.assert_close(tensor, large[name][:m, :], atol=0, rtol=0)
        else:
            torch.testing.assert_close(tensor, large[name], atol=0, rtol=0)


def test_hf_greedy_generate_equals_elastic_greedy_decode(exports):
    ckpt, dirs = exports
    hf = transformers.AutoModelForCausalLM.from_pretrained(dirs["m"], local_files_only=True).eval()
    prompt = [5, 9, 200, 31]
    ours = ckpt.model.generate_greedy(prompt, 12, width="m")
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    n = len(ours)
    assert theirs[:n] == ours


def test_export_of_unknown_width_is_refused(checkpoint_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown width 'xl'"):
        export_width(load_checkpoint(checkpoint_dir), "xl", tmp_path / "x")


@pytest.fixture
def tiny_gpt2_dir(tmp_path, tokenizer):
    """A tiny GPT-2 built and saved the way HF users have them on disk."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=48, n_embd=64, n_layer=2,
                                     n_head=2, n_inner=None, activation_function="gelu_new",
                                     bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path / "tiny-gpt2"
    model.save_pretrained(path, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<|endoftext|>").save_pretrained(path)
    return path, model


def test_import_hf_as_ta_matches_hf_and_nests(tiny_gpt2_dir, tmp_path):
    path, hf = tiny_gpt2_dir
    out = import_hf(path, tmp_path / "imported")
    ckpt = load_checkpoint(out)
    assert ckpt.config.widths == {"s": 32, "m": 64, "l": 128, "ta": 256}
    x = torch.randint(0, ckpt.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(x, width="ta").logits, hf(x).logits, **TOL)
    assert json.loads((out / "training.json").read_text())["recipe"] == "import"


def test_import_refuses_pickle_only_weights(tiny_gpt2_dir):
    path, _ = tiny_gpt2_dir
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no .safetensors weights"):
        import_hf(path, path.parent / "x")
