"""The review gate and shadow mode, end to end: the node (its own Triton, the shipped body and
lung models) on synthetic chest CTs, Orthanc as the clinical PACS and a folder marked
``test: true``.

- ``review: required``: results are archived and visible, nothing reaches Orthanc until an
  operator approves; approving only some structures sends new objects holding only those
  (their references consistent); a rejected job never sends anything and keeps the reason.
- ``mode: shadow``: the archive holds the results (their series descriptions say SHADOW),
  the clinical PACS gets nothing, the test folder gets them.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from tests.peers import (
    ROOT,
    NodeProcess,
    Orthanc,
    http_bytes,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    wait_for,
)
from tests.phantoms import chest_phantom, write_ct_series

pytestmark = pytest.mark.integration
MODELS = ["ct-body", "ct-lungs"]


def _rule(name: str, called: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "when": {"called_ae": called},
        "match": {"Modality": "CT"},
        "select": {"orientation": "axial", "min_instances": 5},
        "models": MODELS,
        "outputs": ["SEG", "SR", "RTSTRUCT"],
        **extra,
    }


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Orthanc, Path]]:
    tmp = tmp_path_factory.mktemp("review")
    orthanc = start_orthanc(tmp / "orthanc")
    rules = tmp / "rules"
    rules.mkdir()
    testbox = tmp / "testbox"
    (rules / "review.yaml").write_text(
        yaml.safe_dump(
            {
                "rules": [
                    _rule("reviewed", "REVIEW", destinations=["pacs"], review="required"),
                    _rule("shadowed", "SHADOW", destinations=["pacs", "testbox"], mode="shadow"),
                ]
            }
        )
    )
    node = start_node(
        tmp / "node",
        orthanc,
        router={"rules_dir": str(rules), "quiet_period_s": 0.5},
        dispatch={
            "destinations": {"testbox": {"kind": "folder", "path": str(testbox), "test": True}}
        },
    )
    yield node, orthanc, testbox
    stop_process(node.process)
    stop_process(orthanc.process)
    assert "Traceback" not in node.log_text()


def _send(node: NodeProcess, out: Path, called: str, patient: str) -> str:
    p = chest_phantom(slices=24, size=96)
    study, files = write_ct_series(p.hu, p.affine, out, patient_id=patient)
    result = storescu(node.dimse_port, files, called)
    assert result.returncode == 0, result.stderr
    return study


def _job(node: NodeProcess, study: str, state: str, timeout_s: float = 180) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        jobs = [j for j in node.get(f"/api/jobs?study={study}") or [] if j["state"] == state]
        return jobs[-1] if jobs else None

    return wait_for(find, timeout_s, f"a {state} job for the study")  # type: ignore[no-any-return]


def _post(node: NodeProcess, path: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(node.url + path, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _in_orthanc(orthanc: Orthanc, study: str) -> dict[str, pydicom.Dataset]:
    """The study's objects in Orthanc, by modality (empty: nothing arrived)."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study}})
    out = {}
    for instance in found or []:
        ds = pydicom.dcmread(io.BytesIO(http_bytes(f"{orthanc.url}/instances/{instance}/file")))
        if ds.Modality != "CT":
            out[ds.Modality] = ds
    return out


def _archived(node: NodeProcess, study: str) -> dict[str, str]:
    """The node's own archive (QIDO-RS): modality -> series description of its results."""
    rows = node.get(f"/dicomweb/studies/{study}/series?includefield=SeriesDescription") or []
    return {
        r["00080060"]["Value"][0]: r.get("0008103E", {}).get("Value", [""])[0]
        for r in rows
        if r["00080060"]["Value"][0] != "CT"
    }


def _events(node: NodeProcess, study: str) -> list[dict[str, Any]]:
    return list(node.get(f"/api/events?study={study}") or [])


def test_reviewed_results_leave_only_once_approved(
    peers: tuple[NodeProcess, Orthanc, Path], tmp_path: Path
) -> None:
    node, orthanc, _ = peers
    study = _send(node, tmp_path / "a", "REVIEW", "REVIEW-A")
    job = _job(node, study, "awaiting_review")
    assert job["options"]["review"] == "required"
    assert set(_archived(node, study)) == {"SEG", "SR", "RTSTRUCT"}  # visible on the node
    states = {d["state"] for o in job["outputs"] for d in o["deliveries"]}
    assert states == {"awaiting_review"}
    time.sleep(3)  # several dispatcher passes: still nothing leaves
    assert _in_orthanc(orthanc, study) == {}

    names = node.get(f"/api/jobs/{job['id']}/structures")["structures"]
    assert set(names) == {"Body", "Right Lung", "Left Lung"}
    status, answer = _post(node, f"/api/jobs/{job['id']}/approve", {"structures": ["Liver"]})
    assert status == 400 and "Liver" in answer["error"]

    # the CLI approves only the lungs: new objects with only them reach Orthanc
    cli = subprocess.run(
        [sys.executable, "-m", "airouter.app.cli", "jobs", "--http-port", str(node.http_port),
         "--approve", str(job["id"]), "--structure", "Right Lung", "--structure", "Left Lung"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    sent_as = json.loads(cli.stdout)["sent_as_job"]
    objects = wait_for(
        lambda: (o := _in_orthanc(orthanc, study)) and len(o) == 3 and o, 180, "the approved 3"
    )
    seg, rt, sr = objects["SEG"], objects["RTSTRUCT"], objects["SR"]
    assert {s.SegmentLabel for s in seg.SegmentSequence} == {"Right Lung", "Left Lung"}
    assert {r.ROIName for r in rt.StructureSetROISequence} == {"Right Lung", "Left Lung"}
    evidence = {
        sop.ReferencedSOPInstanceUID
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for sop in se.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence  # the SR measures the SEG that was sent
    reviewed = node.get(f"/api/jobs/{job['id']}")
    assert reviewed["state"] == "done"
    assert {d["state"] for o in reviewed["outputs"] for d in o["deliveries"]} == {"withheld"}
    assert all(seg.SOPInstanceUID != o["sop_instance_uid"] for o in reviewed["outputs"])
    # the reviewed job is done at approval; the subset's job once its objects are sent
    subset = wait_for(
        lambda: (j := node.get(f"/api/jobs/{sent_as}")) and j["state"] == "done" and j,
        60,
        "the approved subset's job done",
    )
    assert subset["options"]["structures"] == [
        "Right Lung",
        "Left Lung",
    ]
    approved = [e for e in _events(node, study) if e["kind"] == "review_approved"]
    assert approved and "(CLI)" in approved[0]["user"] and "Left Lung" in approved[0]["detail"]

    # approving all of another study's results sends them as they are
    other = _send(node, tmp_path / "b", "REVIEW", "REVIEW-B")
    held = _job(node, other, "awaiting_review")
    status, answer = _post(node, f"/api/jobs/{held['id']}/approve", {})
    assert status == 200 and answer["state"] == "dispatching" and answer["sent_as_job"] is None
    objects = wait_for(lambda: (o := _in_orthanc(orthanc, other)) and len(o) == 3 and o, 60, "3")
    sent = {o["sop_instance_uid"] for o in held["outputs"]}
    assert {ds.SOPInstanceUID for ds in objects.values()} == sent
    assert _job(node, other, "done")["id"] == held["id"]
    status, answer = _post(node, f"/api/jobs/{held['id']}/approve", {})
    assert status == 409  # once only


def test_rejected_results_never_leave(
    peers: tuple[NodeProcess, Orthanc, Path], tmp_path: Path
) -> None:
    node, orthanc, _ = peers
    study = _send(node, tmp_path / "c", "REVIEW", "REVIEW-C")
    job = _job(node, study, "awaiting_review")
    status, answer = _post(node, f"/api/jobs/{job['id']}/reject", {"reason": ""})
    assert status == 422  # a reason is required
    status, answer = _post(
        node, f"/api/jobs/{job['id']}/reject", {"reason": "body contour misses the arms"}
    )
    assert status == 200 and answer["state"] == "rejected"
    assert "body contour misses the arms" in answer["error"]
    time.sleep(3)
    assert _in_orthanc(orthanc, study) == {}
    final = node.get(f"/api/jobs/{job['id']}")
    assert {d["state"] for o in final["outputs"] for d in o["deliveries"]} == {"withheld"}
    # a withheld delivery cannot be pushed out by retrying it
    delivery = node.get("/api/deliveries?state=withheld") or []
    assert delivery, "withheld deliveries are listed"
    status, _ = _post(node, f"/api/deliveries/{delivery[0]['id']}/retry", {})
    assert status == 409
    assert any(e["kind"] == "review_rejected" for e in _events(node, study))
    assert set(_archived(node, study)) == {"SEG", "SR", "RTSTRUCT"}  # kept on the node


def test_shadow_runs_reach_only_test_destinations(
    peers: tuple[NodeProcess, Orthanc, Path], tmp_path: Path
) -> None:
    node, orthanc, testbox = peers
    study = _send(node, tmp_path / "d", "SHADOW", "SHADOW-D")
    job = _job(node, study, "done")
    assert job["options"]["mode"] == "shadow"
    destinations = {d["destination"] for o in job["outputs"] for d in o["deliveries"]}
    assert destinations == {"testbox"}
    archived = _archived(node, study)
    assert set(archived) == {"SEG", "SR", "RTSTRUCT"}
    assert all(d.startswith("SHADOW ") for d in archived.values()), archived
    written = sorted((testbox / study).rglob("*.dcm"))
    assert len(written) == 3
    assert all(str(pydicom.dcmread(p).SeriesDescription).startswith("SHADOW ") for p in written)
    time.sleep(2)
    assert _in_orthanc(orthanc, study) == {}
    shadow = [e for e in _events(node, study) if e["kind"] == "shadow_run"]
    assert shadow and "not to pacs" in shadow[0]["detail"]


def test_a_model_in_shadow_mode_makes_every_run_of_it_a_shadow_run() -> None:
    from airouter.core.db import Job
    from airouter.core.vocab import JobState, RunMode
    from airouter.jobs.pipeline import after_archive, is_shadow
    from inference.cards import load_cards

    cards = load_cards(ROOT / "config" / "models")
    job = Job(models=["ct-body", "ct-lungs"], destinations=["pacs"], options={})
    assert not is_shadow(job, cards)
    shadowed = {**cards, "ct-lungs": cards["ct-lungs"].model_copy(update={"mode": RunMode.SHADOW})}
    assert is_shadow(job, shadowed)
    assert is_shadow(Job(models=["ct-body"], options={"mode": "shadow"}), cards)
    assert after_archive(job) is JobState.DISPATCHING
    assert after_archive(Job(destinations=["pacs"], options={"review": "required"})) is (
        JobState.AWAITING_REVIEW
    )
    assert after_archive(Job(destinations=[], options={"review": "required"})) is JobState.DONE
