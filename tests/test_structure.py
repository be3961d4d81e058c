"""How the pieces fit: layers that point one way, the base install's CLI, and a wheel of runtime packages only."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO

# Blocks every module of the serve and deploy extras, as on a base `pip install -e .`.
WITHOUT_EXTRAS = """
import sys
for name in ("fastapi", "uvicorn", "starlette", "prometheus_client", "httpx", "mmh3", "scipy", "zmq", "msgspec", "ray",
             "locust"):
    sys.modules[name] = None
from cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def run_without_extras(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_the_import_contracts_hold():
    """The layers (cli > serving > router | training > matta), the torch-free router and front end,
    and no cycles, as `make lint` checks them (pyproject.toml [tool.importlinter])."""
    lint = shutil.which("lint-imports", path=str(REPO / ".venv" / "bin")) or shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed (the dev extra)")
    result = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_base_install_runs_the_cli_and_names_the_extra_a_command_needs():
    info = run_without_extras("info", "checkpoints/default")
    assert info.returncode == 0, info.stderr
    assert "ta" in info.stdout and "flops_per_token" in info.stdout
    assert run_without_extras("serve", "--help").returncode == 0
    serve = run_without_extras("serve", "--port", "0")
    assert serve.returncode == 1 and ".[serve]" in serve.stderr and "fastapi" in serve.stderr, serve.stderr
    analyze = run_without_extras("ab", "analyze", "runs/none.sqlite")
    assert analyze.returncode == 1 and ".[serve]" in analyze.stderr and "scipy" in analyze.stderr, analyze.stderr


@pytest.mark.slow
def test_the_wheel_holds_only_the_runtime_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("matta-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if not name.split("/")[0].endswith(
        (".dist-info", ".data"))}
    assert tops == {"matta", "training", "router", "serving", "cli"}, tops


def test_committed_benchmark_results_are_summaries_and_plots():
    """Every file under benchmarks/results/ is at most 100 KB (benchmarks.harness.MAX_RESULT_BYTES):
    summaries and plots live in the repository, per-request rows under runs/ (ignored by git)."""
    tracked = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    files = tracked or [str(p.relative_to(REPO)) for p in (REPO / "benchmarks" / "results").rglob("*") if p.is_file()]
    too_big = {f: (REPO / f).stat().st_size for f in files if (REPO / f).is_file() and (REPO / f).stat().st_size > 100_000}
    assert files and not too_big, too_big
