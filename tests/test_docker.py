"""The production deployment files (no Docker engine here): structure and references."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.peers import ROOT, tool

DOCKER = ROOT / "docker"


def test_compose_services_and_build_files_exist() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {
        "router",
        "router-2",
        "postgres",
        "triton",
        "orthanc",
        "prometheus",
        "grafana",
    }
    for name in ("router", "router-2", "triton"):
        build = services[name]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve().is_file()
    envs = [services[name]["environment"] for name in ("router", "router-2")]
    for router_env in envs:
        assert router_env["AIROUTER_INFERENCE__TRITON_URL"].startswith("triton:")
        assert router_env["AIROUTER_DISPATCH__DESTINATIONS__PACS__HOST"] == "orthanc"
        assert "@postgres:5432/airouter" in router_env["AIROUTER_DATABASE_URL"]
    # the replicas: one database, one data volume at one path, a name each, ports apart
    assert envs[0]["AIROUTER_DATABASE_URL"] == envs[1]["AIROUTER_DATABASE_URL"]
    assert services["router"]["volumes"] == services["router-2"]["volumes"]
    assert envs[0]["AIROUTER_NODE_NAME"] != envs[1]["AIROUTER_NODE_NAME"]
    host_ports = [p.rsplit(":", 1)[0] for n in ("router", "router-2") for p in services[n]["ports"]]
    assert len(host_ports) == len(set(host_ports))
    assert "postgres" in services["router-2"]["depends_on"]
    json.loads((DOCKER / "orthanc" / "orthanc.json").read_text())


def test_compose_environment_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's environment in docker-compose.yml loads (a renamed key would stop it)."""
    from airouter.core.settings import load_settings

    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    for key in [k for k in os.environ if k.startswith("AIROUTER_")]:
        monkeypatch.delenv(key)
    for key, value in compose["services"]["router-2"]["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings()
    assert settings.node_name == "router-2"
    assert (settings.database_url or "").startswith("postgresql+psycopg://airouter:")
    assert settings.inference.triton_url == "triton:8000"
    assert settings.dispatch.destinations["pacs"].host == "orthanc"  # type: ignore[union-attr]
    assert "router" in (settings.http.served_hosts() or ())


def test_dockerfiles_copy_only_what_exists_and_run_the_console_script() -> None:
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "triton" / "Dockerfile"):
        # (COPY --from=<stage> copies from an earlier stage of the build, not the tree)
        for source in re.findall(r"^COPY ([^-\s]\S*) ", dockerfile.read_text(), flags=re.M):
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}"
    text = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["airouter", "serve"]' in text
    # the dashboard's htmx, at the version the Makefile installs, where the node serves it
    pinned = re.search(r"^HTMX_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert pinned is not None and f"htmx.org@{pinned.group(1)}" in text
    assert "./airouter/app/web/static/vendor/" in text
    # the viewer: one OHIF version in the Makefile, the image and the code that serves it
    from airouter.app.web.viewer import OHIF_VERSION

    ohif = re.search(r"^OHIF_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert ohif is not None and ohif.group(1) == OHIF_VERSION
    assert f"@ohif/app@{OHIF_VERSION}" in text and "airouter.app.web.viewer install" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'airouter = "airouter.app.cli:main"' in pyproject
    # every package the wheel holds is copied into the image before `pip install .`
    packages = re.search(r"include = \[([^\]]*)\]", pyproject)
    assert packages is not None
    for name in re.findall(r'"(\w+)\*"', packages.group(1)):
        assert f"COPY {name} ./{name}" in text, name


def test_triton_image_serves_the_bundled_model_repository() -> None:
    text = (DOCKER / "triton" / "Dockerfile").read_text()
    assert "COPY inference/model_repository /models" in text
    models = sorted(p.name for p in (ROOT / "inference" / "model_repository").iterdir())
    cards = sorted(
        yaml.safe_load(p.read_text())["triton_model"]
        for p in (ROOT / "config" / "models").glob("*.yaml")
    )
    assert models == cards


def test_prometheus_configuration_is_valid_and_grafana_charts_what_the_node_exports() -> None:
    """promtool accepts the scrape configuration; every metric a Grafana panel queries is
    one the node exports (a renamed metric would leave a panel empty without a word)."""
    checked = subprocess.run(
        [
            tool("promtool"),
            "check",
            "config",
            "--syntax-only",
            str(DOCKER / "prometheus" / "prometheus.yml"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["router:8080", "router-2:8080"]
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "airouter.json").read_text())
    exported = _exported_metric_names()
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(airouter_\w+)", target["expr"])
    }
    assert queried and queried <= exported, queried - exported
    assert len(dashboard["panels"]) >= 10


def _exported_metric_names() -> set[str]:
    """What /metrics may answer: the counted metrics with their sample suffixes, and the
    families read at the scrape."""
    from prometheus_client.metrics import MetricWrapperBase

    from airouter.app import metrics as read
    from airouter.core import metrics as counted

    names: set[str] = set()
    for value in vars(counted).values():
        if isinstance(value, MetricWrapperBase):
            base = value._name
            names |= {base, f"{base}_total", f"{base}_bucket", f"{base}_count", f"{base}_sum"}
    names |= set(re.findall(r'"(airouter_\w+)"', Path(read.__file__).read_text()))
    return names
