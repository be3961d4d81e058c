"""The matta CLI: info/export on good and tampered checkpoints, exit codes, --json."""

import json
import subprocess
import sys

import pytest

from cli.main import main
from tests.helpers import REPO


def test_info_prints_widths_and_writes_json(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "info.json"
    assert main(["info", str(checkpoint_dir), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for width in ("s", "m", "l", "ta"):
        assert f"\n{width} " in table
    info = json.loads(out.read_text())
    assert list(info["widths"]) == ["s", "m", "l", "ta"]
    flops = [w["flops_per_token"] for w in info["widths"].values()]
    assert flops == sorted(flops)
    assert info["widths"]["ta"]["flops_vs_full"] == 1.0


def test_export_via_cli(checkpoint_dir, tmp_path, capsys):
    assert main(["export", str(checkpoint_dir), "--width", "m", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["n_inner"] == 64


@pytest.mark.parametrize("command", [["info"], ["export", "--width", "s", "--out", "OUT"], ["generate", "--prompt", "To be"]])
def test_every_loading_command_refuses_a_tampered_checkpoint(checkpoint_dir, tmp_path, capsys, command):
    weights = checkpoint_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    argv = [command[0], str(checkpoint_dir), *[str(tmp_path / "o") if a == "OUT" else a for a in command[1:]]]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "model.safetensors: sha256 mismatch" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_console_script_exit_code_and_help(checkpoint_dir):
    (checkpoint_dir / "tokenizer.json").unlink()
    done = subprocess.run([sys.executable, "-m", "cli", "info", str(checkpoint_dir)], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 1 and "tokenizer.json: missing" in done.stderr
    for sub in ("info", "export", "train", "eval", "import-hf", "generate"):
        helped = subprocess.run([sys.executable, "-m", "cli", sub, "--help"], capture_output=True, text=True, cwd=REPO)
        assert helped.returncode == 0 and "usage: matta" in helped.stdout


def test_generate_prints_a_completion_per_width(checkpoint_dir, capsys):
    assert main(["generate", str(checkpoint_dir), "--prompt", "To be", "--max-tokens", "3", "--width", "s"]) == 0
    assert "--- width s ---" in capsys.readouterr().out
