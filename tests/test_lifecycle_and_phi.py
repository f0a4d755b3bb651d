"""The running node: a job in flight at three crashes ends failed and the node stays up; a
failed job retried runs again as a new version; a cancelled job never runs; a patient's name,
ID and birth date stay out of the log and the API with ``log_phi`` off (and appear with it on,
so the test can see them when they leak)."""

from __future__ import annotations

import http.client
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference.triton import LocalTriton
from tests.peers import ROOT, NodeProcess, free_port, start_node, storescu, wait_for
from tests.phantoms import chest_phantom, write_ct_series

pytestmark = pytest.mark.integration

# A single-component name (highdicom warns, quoting it) and a legacy dashed birth date (which
# used to fail the job in the SEG build): the job must succeed and neither may leak.
NAME, PATIENT_ID, BIRTH_DATE = "Zzsentinelname", "ZZPID-4711", "1961-09-07"


def _rules(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rules = [
        {
            "name": "segment-ct",
            "match": {"Modality": "CT"},
            "select": {"min_instances": 5},
            "models": ["ct-body"],
            "outputs": ["SEG", "SR"],
        },
        {  # never matches: its explanation would quote the patient's ID
            "name": "one-patient-only",
            "when": {"PatientID": {"regex": "^NOBODY$"}},
            "models": ["ct-body"],
        },
    ]
    (directory / "r.yaml").write_text(yaml.safe_dump({"rules": rules}))
    return directory


def _send(node: NodeProcess, out: Path, seed: int, **patient: str) -> str:
    p = chest_phantom(slices=16, size=64)
    p.hu[:, :, : seed % 5] = -1000  # studies differ a little
    study, files = write_ct_series(p.hu, p.affine, out, **patient)
    result = storescu(node.dimse_port, files)
    assert result.returncode == 0, result.stderr
    return study


def _job(node: NodeProcess, study: str) -> dict[str, Any] | None:
    jobs = [j for j in node.get(f"/api/jobs?study={study}") or [] if j["rule"] == "segment-ct"]
    return jobs[-1] if jobs else None


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "airouter.app.cli",
            "jobs",
            *args,
            "--http-port",
            str(node.http_port),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def _wait_in_flight(node: NodeProcess, study: str, attempts: int) -> None:
    def in_flight() -> bool:
        job = _job(node, study) or {}
        return job.get("attempts") == attempts and job.get("state") == "waiting_inference"

    wait_for(in_flight, 60, f"the job in flight again (attempt {attempts})")


def _settings(tmp_path: Path, triton_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "router": {"rules_dir": str(_rules(tmp_path / "rules")), "quiet_period_s": 0.3},
        "inference": {"triton_url": triton_url, "retry_max_s": 0.5},
        "jobs": {"workers": 1, "max_attempts": 3},
        **extra,
    }


def test_a_job_in_flight_at_three_crashes_fails_then_retried_runs_again(
    tmp_path: Path, triton: LocalTriton
) -> None:
    # No Triton answers on this port: the job stays in flight (waiting for inference) until
    # the node is killed, as a job that crashes the node would be.
    nowhere = _settings(tmp_path, f"127.0.0.1:{free_port()}")
    node = start_node(tmp_path / "node", None, wait_triton=False, **nowhere)
    study = _send(node, tmp_path / "s1", 1)
    wait_for(lambda: (_job(node, study) or {}).get("state") == "waiting_inference", 60, "job 1")
    # A second study queues behind it (one worker) and is cancelled from the CLI.
    other = _send(node, tmp_path / "s2", 2)
    queued = wait_for(lambda: _job(node, other), 60, "the second job")
    assert queued["state"] == "queued"
    cancelled = _cli(node, "--cancel", str(queued["id"]))
    assert cancelled.returncode == 0, cancelled.stderr
    assert _cli(node, "--cancel", str(queued["id"])).returncode == 1  # already cancelled

    first = _job(node, study)
    assert first is not None and first["attempts"] == 1
    for crash in range(3):
        if crash:
            node = start_node(tmp_path / "node", None, wait_triton=False, **nowhere)
            _wait_in_flight(node, study, crash + 1)
        node.process.kill()  # SIGKILL: a crash, not a shutdown
        node.process.wait()

    node = start_node(tmp_path / "node", None, **_settings(tmp_path, triton.url("http")))
    failed = _job(node, study)
    assert failed is not None and failed["state"] == "failed", failed
    assert "stopped 3 times" in failed["error"] and failed["attempts"] == 3
    assert node.get("/api/health")["status"] == "ok"
    assert node.process.poll() is None  # up, and it stays up

    answer = _cli(node, "--retry", str(failed["id"]))
    assert answer.returncode == 0, answer.stderr
    retried = wait_for(
        lambda: (j := _job(node, study)) and j["state"] == "done" and j,
        120,
        "the retried job to finish",
    )
    assert retried["id"] != failed["id"] and retried["version"] == failed["version"] + 1
    assert {o["kind"] for o in retried["outputs"]} == {"SEG", "SR"}
    # the cancelled job never ran, even with Triton back and the worker free
    still = _job(node, other)
    assert still is not None and still["state"] == "cancelled" and still["outputs"] == []
    assert still["attempts"] == 0
    kinds = [e["kind"] for e in node.get("/api/events")]
    assert {"job_cancelled", "job_retried", "job_failed"} <= set(kinds)
    node.process.terminate()
    node.process.wait(timeout=30)


def _leaks(node: NodeProcess, study: str) -> dict[str, list[str]]:
    """Where the patient's name, ID or birth date appear: the log and the API answers."""
    texts = {
        "log": node.log_text(),
        "/api/events": str(node.get("/api/events")),
        "/api/jobs": str(node.get("/api/jobs")),
        "/api/rules": str(node.get("/api/rules")),
        "/api/studies/{study}/rules": str(node.get(f"/api/studies/{study}/rules")),
    }
    values = (NAME, PATIENT_ID, BIRTH_DATE, BIRTH_DATE.replace("-", ""))
    return {where: [v for v in values if v in text] for where, text in texts.items()}


@pytest.mark.parametrize("log_phi", [False, True])
def test_patient_identity_stays_out_of_logs_and_answers(
    tmp_path: Path, triton: LocalTriton, log_phi: bool
) -> None:
    """A single-component name makes highdicom warn, quoting it, while it writes the SEG; the
    dry run of a rule on PatientID would quote the ID."""
    settings = _settings(tmp_path, triton.url("http"), log_phi=log_phi)
    node = start_node(tmp_path / "node", None, **settings)
    try:
        study = _send(
            node, tmp_path / "s", 3, patient_name=NAME, patient_id=PATIENT_ID, birth_date=BIRTH_DATE
        )
        wait_for(lambda: (_job(node, study) or {}).get("state") == "done", 120, "the job")
        kinds = [e["kind"] for e in node.get(f"/api/events?study={study}")]
        assert "source_values_repaired" in kinds  # the dashed date, by keyword only
        # QIDO-RS exists to show patient data: it does (the node did receive them) ...
        assert PATIENT_ID in str(node.get("/dicomweb/studies"))
        # ... but not to a page of another site whose name resolves to us (DNS rebinding)
        connection = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
        connection.request("GET", "/dicomweb/studies", headers={"Host": "attacker.example"})
        answer = connection.getresponse()
        body = answer.read().decode()
        assert answer.status == 400 and PATIENT_ID not in body
        leaks = _leaks(node, study)
        if log_phi:  # the same run with log_phi on shows what the filter keeps out
            assert NAME in leaks["log"], leaks
            assert PATIENT_ID in leaks["/api/studies/{study}/rules"], leaks
        else:
            assert leaks == {where: [] for where in leaks}, leaks
            assert "[redacted]" in node.log_text()  # the warning is there, without the name
    finally:
        node.process.terminate()
        node.process.wait(timeout=30)
