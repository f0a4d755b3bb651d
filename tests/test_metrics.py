"""Prometheus metrics: a real Prometheus (Debian ``prometheus``) scrapes the node, with a
bearer token, while a study goes through it; its query API answers the instance counters and
the job durations with the values the node's state store holds. The node runs two processes
sharing the DIMSE port (the counts of both are summed: prometheus-client's multiprocess
mode)."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from airouter.app import accounts
from airouter.core.db import Instance, Job, Store
from airouter.core.vocab import JobState, Role
from tests.peers import (
    free_port,
    fresh_copy,
    head_ct_files,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    tool,
    wait_for,
)

pytestmark = pytest.mark.integration


def _query(prometheus: str, expression: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?query={urllib.parse.quote(expression)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.load(response)
    except OSError:
        return []
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def _value(prometheus: str, expression: str) -> float | None:
    result = _query(prometheus, expression)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_right_counts_from_two_processes(tmp_path: Path) -> None:
    data = tmp_path / "node" / "var"
    data.mkdir(parents=True)
    store = Store(f"sqlite:///{data / 'airouter.db'}")
    accounts.add_user(store, "prometheus", Role.VIEWER, "scrape only, never sign in")
    _, token = accounts.create_token(store, "prometheus", "scrape")
    orthanc = start_orthanc(tmp_path / "pacs")
    node = start_node(
        tmp_path / "node",
        orthanc,
        token=token,
        scp={"processes": 2},
        router={"quiet_period_s": 1.0},
    )
    web_port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "airouter",
                "authorization": {"type": "Bearer", "credentials": token},
                "static_configs": [{"targets": [f"127.0.0.1:{node.http_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
    prometheus = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{web_port}"
    try:
        wait_for(lambda: _value(url, 'up{job="airouter"}') == 1, 60, "Prometheus to scrape")
        # two series, each on its own association (either process may take either)
        files = head_ct_files()
        first = fresh_copy(files, tmp_path / "a", count=30)
        second = fresh_copy(files, tmp_path / "b", count=40)
        for series in (first, second):
            sent = storescu(node.dimse_port, series)
            assert sent.returncode == 0, sent.stderr
        # one instance the node refuses (no Study Instance UID)
        broken = pydicom.dcmread(first[0])
        broken.StudyInstanceUID = ""
        broken.SOPInstanceUID = generate_uid()
        broken.save_as(tmp_path / "broken.dcm")
        storescu(node.dimse_port, [tmp_path / "broken.dcm"])

        def ended() -> list[Job] | None:
            with store.session() as s:
                jobs = list(s.scalars(select(Job)).all())
            return jobs if len(jobs) == 2 and all(j.state.ended for j in jobs) else None

        jobs = wait_for(ended, 240, "both jobs to end")
        assert all(j.state is JobState.DONE for j in jobs), [(j.state, j.error) for j in jobs]
        received = 'sum(airouter_instances_received_total{calling_ae="MODALITY"})'
        wait_for(lambda: _value(url, received) == 70, 30, "70 instances counted")
        refused = _query(url, "airouter_instances_refused_total")
        assert refused and sum(float(r["value"][1]) for r in refused) >= 1
        assert all(r["metric"]["calling_ae"] == "MODALITY" for r in refused)
        with store.session() as s:
            stored = s.scalar(
                select(func.sum(Instance.size)).where(Instance.calling_ae == "MODALITY")
            )
        assert _value(url, "sum(airouter_received_bytes_total)") == stored
        # the job durations: as many as jobs, their sum what the state store says
        count = 'sum(airouter_job_duration_seconds_count{state="done"})'
        wait_for(lambda: _value(url, count) == 2, 30, "two job durations")
        total = _value(url, 'sum(airouter_job_duration_seconds_sum{state="done"})')
        expected = sum((j.finished_at - j.started_at).total_seconds() for j in jobs)  # type: ignore[operator]
        assert total == pytest.approx(expected, abs=0.05)
        stages = {
            r["metric"]["stage"] for r in _query(url, "airouter_job_stage_seconds_count") if r
        }
        assert {"volume", "inference", "encode", "dispatch"} <= stages
        assert _value(url, 'sum(airouter_delivery_latency_seconds_count{destination="pacs"})') == 6
        assert _value(url, 'airouter_deliveries{state="sent",destination="pacs"}') == 6
        assert _value(url, 'sum(airouter_jobs{state="done"})') == 2
        assert _value(url, "airouter_triton_ready") == 1
        assert (_value(url, "airouter_free_bytes") or 0) > 0
        assert _value(url, "sum(airouter_open_associations)") == 0
        wait = _query(url, "airouter_study_completion_wait_seconds_count")
        assert sum(float(r["value"][1]) for r in wait) == 2
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        stop_process(node.process)
        stop_process(orthanc.process)
    assert "Traceback" not in node.log_text()
