"""The outbox: a PACS that is down gets everything once it is back, exactly once; a destination
that rejects ends in the dead-letter state with its answer shown; a manual retry."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    RTStructureSetStorage,
    SegmentationStorage,
)

from tests.peers import (
    free_port,
    fresh_copy,
    head_ct_files,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.integration

RULE = """rules:
  - name: body-to-two
    match: {Modality: CT}
    models: [ct-body]
    destinations: [pacs, reject]
"""


def _rejecting_scp(port: int) -> Any:
    """A destination that refuses every object (out of resources)."""
    ae = AE(ae_title="REJECT")
    for sop in (SegmentationStorage, Comprehensive3DSRStorage, RTStructureSetStorage):
        ae.add_supported_context(sop)
    return ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0xA700)]
    )


def _post(url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_pacs_down_then_back_gets_everything_once_and_rejections_end_dead(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(RULE)
    orthanc = start_orthanc(tmp_path / "orthanc")
    reject_port = free_port()
    rejecting = _rejecting_scp(reject_port)
    node = start_node(
        tmp_path / "node",
        orthanc,
        router={"rules_dir": str(tmp_path / "rules")},
        dispatch={
            "backoff_s": 0.5,
            "max_attempts": 6,
            "destinations": {
                "reject": {"ae_title": "REJECT", "host": "127.0.0.1", "port": reject_port}
            },
        },
    )
    try:
        stop_process(orthanc.process)  # the PACS goes down
        files = fresh_copy(head_ct_files()[55:85], tmp_path / "ct")
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        assert storescu(node.dimse_port, files).returncode == 0

        def pacs_failing() -> bool:
            rows = node.get("/api/deliveries") or []
            return any(d["destination"] == "pacs" and d["state"] == "failed" for d in rows)

        wait_for(pacs_failing, 120, "a failed delivery to the PACS")
        orthanc = start_orthanc(tmp_path / "orthanc", orthanc.http_port, orthanc.dicom_port)

        def settled() -> list[dict] | None:
            rows = node.get("/api/deliveries") or []
            pacs = [d for d in rows if d["destination"] == "pacs"]
            dead = [d for d in rows if d["destination"] == "reject" and d["state"] == "dead"]
            done = pacs and all(d["state"] == "sent" for d in pacs) and len(dead) == len(pacs)
            return rows if done else None

        rows = wait_for(settled, 120, "deliveries to settle")
        pacs = [d for d in rows if d["destination"] == "pacs"]
        assert {d["kind"] for d in pacs} == {"SEG", "SR", "RTSTRUCT"}
        assert any(d["attempts"] > 1 for d in pacs)  # they were retried
        for modality in ("SEG", "SR", "RTSTRUCT"):  # exactly once in the PACS
            found = [
                s
                for s in orthanc.get("/series?expand") or []
                if s["MainDicomTags"].get("Modality") == modality
            ]
            assert len(found) == 1 and len(found[0]["Instances"]) == 1, modality
        dead = node.get("/api/deliveries?state=dead")
        assert len(dead) == 3 and all("0xA700" in d["last_status"] for d in dead)
        assert all(d["attempts"] == 6 for d in dead)
        (job,) = node.get(f"/api/jobs?study={study}")
        assert job["state"] == "failed" and "reject" in job["error"]

        status, body = _post(f"{node.url}/api/deliveries/{dead[0]['id']}/retry")
        assert status == 200 and body["state"] == "pending"
        retried = wait_for(
            lambda: next(
                (
                    d
                    for d in node.get("/api/deliveries")
                    if d["id"] == dead[0]["id"] and d["state"] == "dead"
                ),
                None,
            ),
            60,
            "the retried delivery to die again",
        )
        assert retried["attempts"] == 6  # a fresh round of attempts
        status, body = _post(f"{node.url}/api/deliveries/{pacs[0]['id']}/retry")
        assert status == 409 and "sent" in body["error"]
        assert node.get("/api/events?kind=delivery_retry")
    finally:
        stop_process(node.process)
        stop_process(orthanc.process)
        rejecting.shutdown()


def test_stow_rest_folder_and_return_to_sender_each_get_the_objects_once(tmp_path: Path) -> None:
    """One rule, five destinations: STOW-RS with basic auth (Orthanc's DICOMweb plugin), the
    same with a wrong password (dead with the HTTP status), Orthanc's REST API, a folder, and
    "@sender" (the modality's AE title is configured as a DICOM node: another Orthanc)."""
    user = ("airouter", "s3cret-pw")
    pacs = start_orthanc(tmp_path / "pacs", user=user)
    modality = start_orthanc(tmp_path / "modality", extra={"DicomAet": "MODALITY"})
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(
        "rules:\n"
        "  - name: body-everywhere\n"
        "    match: {Modality: CT}\n"
        "    models: [ct-body]\n"
        "    destinations: [web, web-bad, rest, folder, '@sender']\n"
    )
    folder = tmp_path / "outbox-folder"
    node = start_node(
        tmp_path / "node",
        None,
        router={"rules_dir": str(tmp_path / "rules")},
        dispatch={
            "backoff_s": 0.2,
            "max_attempts": 2,
            "destinations": {
                "web": {
                    "kind": "dicomweb",
                    "url": f"{pacs.url}/dicom-web",
                    "username": user[0],
                    "password": user[1],
                },
                "web-bad": {
                    "kind": "dicomweb",
                    "url": f"{pacs.url}/dicom-web",
                    "username": user[0],
                    "password": "wrong",
                },
                "rest": {
                    "kind": "orthanc",
                    "url": pacs.url,
                    "username": user[0],
                    "password": user[1],
                },
                "folder": {"kind": "folder", "path": str(folder)},
                "modality": {
                    "ae_title": "MODALITY",
                    "host": "127.0.0.1",
                    "port": modality.dicom_port,
                },
            },
        },
    )
    try:
        files = fresh_copy(head_ct_files()[55:85], tmp_path / "ct")
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        assert storescu(node.dimse_port, files).returncode == 0

        def settled() -> list[dict] | None:
            rows = node.get("/api/deliveries") or []
            final = [d for d in rows if d["state"] in ("sent", "dead")]
            return rows if len(rows) == 15 and len(final) == 15 else None

        rows = wait_for(settled, 180, "15 deliveries to settle")
        by_destination: dict[str, list[dict]] = {}
        for d in rows:
            by_destination.setdefault(d["destination"], []).append(d)
        assert set(by_destination) == {"web", "web-bad", "rest", "folder", "modality"}
        answers = {"web": "STOW-RS stored", "rest": "Orthanc REST: instance", "folder": "written"}
        for name, text in answers.items():
            assert all(d["state"] == "sent" for d in by_destination[name]), name
            assert all(text in d["last_status"] for d in by_destination[name]), name
        assert all(d["state"] == "dead" for d in by_destination["web-bad"])
        assert all("HTTP 401" in d["last_status"] for d in by_destination["web-bad"])
        assert all(d["last_status"] == "C-STORE status 0x0000" for d in by_destination["modality"])
        # exactly once: the PACS got each object by STOW and by REST, and holds it once
        (job,) = node.get(f"/api/jobs?study={study}")
        sops = {o["sop_instance_uid"] for o in job["outputs"]}
        assert len(sops) == 3
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.get("/instances?expand")} == sops
        assert {
            i["MainDicomTags"]["SOPInstanceUID"] for i in modality.get("/instances?expand")
        } == sops
        written = {p.stem: p.read_bytes() for p in folder.rglob("*.dcm")}
        assert set(written) == sops
        for path in (tmp_path / "node" / "var" / "archive").rglob("*.dcm"):
            if path.stem in sops:
                assert written[path.stem] == path.read_bytes()  # as archived, byte for byte
    finally:
        stop_process(node.process)
        stop_process(pacs.process)
        stop_process(modality.process)


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_c_store_over_tls_to_orthanc_and_an_untrusted_server_is_refused(tmp_path: Path) -> None:
    """Orthanc with DICOM TLS (mutual: it requires our certificate); a destination that does
    not trust Orthanc's certificate never sends anything in clear."""
    cert, key = _self_signed(tmp_path / "pki", "pacs")
    other, _ = _self_signed(tmp_path / "pki", "other")
    pacs = start_orthanc(
        tmp_path / "pacs",
        extra={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(cert),
            "DicomTlsPrivateKey": str(key),
            "DicomTlsTrustedCertificates": str(cert),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(
        "rules:\n  - name: tls\n    match: {Modality: CT}\n    models: [ct-body]\n"
        "    outputs: [SEG]\n    destinations: [secure, untrusted]\n"
    )
    node_tls = {"ca_file": str(cert), "cert_file": str(cert), "key_file": str(key)}
    node = start_node(
        tmp_path / "node",
        None,
        router={"rules_dir": str(tmp_path / "rules")},
        dispatch={
            "backoff_s": 0.2,
            "max_attempts": 2,
            "destinations": {
                "secure": {
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                    "tls": node_tls,
                },
                "untrusted": {
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                    "tls": {**node_tls, "ca_file": str(other)},
                },
            },
        },
    )
    try:
        files = fresh_copy(head_ct_files()[55:85], tmp_path / "ct")
        assert storescu(node.dimse_port, files).returncode == 0

        def settled() -> list[dict] | None:
            rows = node.get("/api/deliveries") or []
            return (
                rows
                if len(rows) == 2 and all(d["state"] in ("sent", "dead") for d in rows)
                else None
            )

        rows = {d["destination"]: d for d in wait_for(settled, 120, "both deliveries")}
        assert rows["secure"]["state"] == "sent"
        assert rows["secure"]["last_status"] == "C-STORE status 0x0000"
        assert rows["untrusted"]["state"] == "dead"
        assert "(TLS) failed" in rows["untrusted"]["last_status"]
        assert len(pacs.get("/instances") or []) == 1  # the SEG, once
    finally:
        stop_process(node.process)
        stop_process(pacs.process)


def test_storage_commitment_is_requested_and_the_pacs_report_recorded(tmp_path: Path) -> None:
    """Orthanc as a storage commitment SCP: after the C-STOREs, an N-ACTION asks it to commit;
    its N-EVENT-REPORT comes back to the node's own AE and each delivery says "committed"."""
    node_port = free_port()
    pacs = start_orthanc(
        tmp_path / "pacs",
        extra={"DicomModalities": {"airouter": ["AIROUTER", "127.0.0.1", node_port]}},
    )
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "r.yaml").write_text(
        "rules:\n  - name: commit\n    match: {Modality: CT}\n    models: [ct-body]\n"
        "    destinations: [pacs]\n"
    )
    node = start_node(
        tmp_path / "node",
        None,
        scp={"dimse_port": node_port},
        router={"rules_dir": str(tmp_path / "rules")},
        dispatch={
            "destinations": {
                "pacs": {
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                    "storage_commitment": True,
                }
            }
        },
    )
    try:
        files = fresh_copy(head_ct_files()[55:85], tmp_path / "ct")
        assert storescu(node.dimse_port, files).returncode == 0

        def committed() -> list[dict] | None:
            rows = node.get("/api/deliveries") or []
            done = len(rows) == 3 and all(d["commitment"] == "committed" for d in rows)
            return rows if done else None

        rows = wait_for(committed, 120, "the PACS to commit to the three objects")
        assert all(d["state"] == "sent" for d in rows)
        assert all("storage commitment requested" in d["last_status"] for d in rows)
        (event,) = node.get("/api/events?kind=storage_commitment")
        assert '"committed": 3' in event["detail"] and '"failed": 0' in event["detail"]
    finally:
        stop_process(node.process)
        stop_process(pacs.process)


def test_a_job_failed_by_a_stale_check_ends_done_once_its_retried_deliveries_are_sent(
    tmp_path: Path, database_url: str
) -> None:
    """The dashboard's retry race: a check read a delivery as dead just before an operator
    retried it, and failed the job after the retry. Once the deliveries are sent, the job
    ends done, not failed."""
    from airouter.core.db import Delivery, Job, Output, Store
    from airouter.core.settings import load_settings
    from airouter.core.vocab import DeliveryState, JobState
    from dispatch.outbox import Dispatcher

    store = Store(database_url)
    with store.session() as s:
        job = Job(study_uid="1.2.3", series_uid="1.2.3.4", rule="r", models=[],
                  outputs=["SEG"], destinations=["pacs"], state=JobState.FAILED,
                  error="delivery to pacs failed: no association")  # fmt: skip
        s.add(job)
        s.flush()
        ids = []
        for n in range(2):
            out = Output(job_id=job.id, kind="SEG", sop_instance_uid=f"1.2.3.4.{n}",
                         series_uid="1", path="x")  # fmt: skip
            s.add(out)
            s.flush()
            d = Delivery(output_id=out.id, destination="pacs", state=DeliveryState.PENDING)
            s.add(d)
            s.flush()
            ids.append(d.id)
        job_id = job.id
    dispatcher = Dispatcher(store, load_settings(data_dir=tmp_path).dispatch)
    for delivery_id in ids:  # both retried and sent; the job stayed failed meanwhile
        dispatcher._record(delivery_id, True, "C-STORE status 0x0000")
    dispatcher._finish_jobs()
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state is JobState.DONE and job.error is None
