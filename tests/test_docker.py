"""The production deployment files (no Docker engine here): structure and references."""

from __future__ import annotations

import json
import re

import yaml

from tests.peers import ROOT

DOCKER = ROOT / "docker"


def test_compose_services_and_build_files_exist() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"router", "triton", "orthanc"}
    for name in ("router", "triton"):
        build = compose["services"][name]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file()
    router_env = compose["services"]["router"]["environment"]
    assert router_env["AIROUTER_TRITON_URL"].startswith("triton:")
    assert router_env["AIROUTER_DESTINATIONS__PACS__HOST"] == "orthanc"
    json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())


def test_dockerfiles_copy_only_what_exists_and_run_the_console_script() -> None:
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "triton" / "Dockerfile"):
        for source in re.findall(r"^COPY (\S+) ", dockerfile.read_text(), flags=re.M):
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}"
    text = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["airouter", "serve"]' in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'airouter = "airouter.cli:main"' in pyproject


def test_triton_image_serves_the_bundled_model_repository() -> None:
    text = (DOCKER / "triton" / "Dockerfile").read_text()
    assert "COPY inference/model_repository /models" in text
    models = sorted(p.name for p in (ROOT / "inference" / "model_repository").iterdir())
    cards = sorted(
        yaml.safe_load(p.read_text())["triton_model"]
        for p in (ROOT / "config" / "models").glob("*.yaml")
    )
    assert models == cards
