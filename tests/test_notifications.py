"""Notifications end to end: the node (its own Triton, the shipped body and lung models) tells a
webhook receiver and a FHIR server about its jobs, and both are down when the jobs end.

- A STAT job (its results found: a ``stat_finding`` before delivery, then ``done``) and a job
  whose delivery is dead (``failed``).
- The webhook receiver checks every request's HMAC signature and answers 503 to the first one
  it gets once up (retried like a refusal); the FHIR server parses every Bundle with
  fhir.resources (R4B) and keeps resources by identifier, as a conditional PUT does.
- Each receiver gets exactly one notification per (job, event) it subscribes to, in order,
  after being down for several of the node's attempts; the webhook's carries no patient
  identity, the FHIR report references the study and the patient, and its Observations hold
  the volumes the SR in the PACS holds (read back with highdicom, not with the node's reader).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import highdicom as hd
import pydicom
import pytest
import yaml
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage

from tests.peers import (
    NodeProcess,
    Orthanc,
    free_port,
    http_bytes,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    wait_for,
)
from tests.phantoms import chest_phantom, write_ct_series

pytestmark = pytest.mark.integration
SECRET = "a-webhook-secret-of-the-site"
PATIENT_ID, PATIENT_NAME = "NOTIFY-4711", "Notified^Patricia"


@dataclass
class Receiver:
    """A local HTTP server that can be down (not listening) and come up on its port."""

    port: int
    received: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # requests it turned down, and why
    fail_first: int = 0  # answer 503 to this many valid requests once up
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # FHIR: by identifier
    server: ThreadingHTTPServer | None = None

    def handle(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    status, answer = receiver.handle(self.headers, body)
                except Exception as exc:  # an invalid request: say why, keep it
                    receiver.refused.append(repr(exc))
                    status, answer = 400, {"error": repr(exc)}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class Webhook(Receiver):
    """Checks the signature over ``<timestamp>.<body>`` and keeps each body once."""

    def handle(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        timestamp = headers["X-Airouter-Timestamp"]
        expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
        if not hmac.compare_digest(
            headers["X-Airouter-Signature"], "sha256=" + expected.hexdigest()
        ):
            raise ValueError("bad signature")
        assert abs(time.time() - int(timestamp)) < 300
        payload = json.loads(body)
        assert headers["X-Airouter-Event"] == payload["event"]
        if self.fail_first > 0:
            self.fail_first -= 1
            return 503, {"error": "busy"}
        self.received.append({**payload, "_delivery": headers["X-Airouter-Delivery"]})
        return 200, {"ok": True}


class Fhir(Receiver):
    """A FHIR server's transaction endpoint: validates, keeps resources by identifier."""

    def handle(self, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        assert headers["Content-Type"] == "application/fhir+json"
        bundle = Bundle.model_validate_json(body)
        assert bundle.type == "transaction" and bundle.entry
        answers = []
        for entry in bundle.entry:
            resource = entry.resource
            kind = resource.get_resource_type()
            model = {"DiagnosticReport": DiagnosticReport, "Observation": Observation}[kind]
            model.model_validate(resource.model_dump())  # a valid R4B resource on its own
            assert entry.request.method == "PUT"
            url = unquote(entry.request.url)
            ident = resource.identifier[0]
            assert url == f"{kind}?identifier={ident.system}|{ident.value}"
            assert entry.fullUrl.startswith("urn:uuid:")
            self.resources[url] = resource.model_dump(mode="json", exclude_none=True)
            answers.append({"response": {"status": "200 OK"}})
        self.received.append(json.loads(body))
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}


def _rule(name: str, called: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "when": {"called_ae": called},
        "match": {"Modality": "CT"},
        "select": {"orientation": "axial", "min_instances": 5},
        "models": ["ct-body", "ct-lungs"],
        "outputs": ["SEG", "SR", "RTSTRUCT"],
        **extra,
    }


@pytest.fixture(scope="module")
def peers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[NodeProcess, Orthanc, Webhook, Fhir]]:
    tmp = tmp_path_factory.mktemp("notify")
    orthanc = start_orthanc(tmp / "orthanc")
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "notify.yaml").write_text(
        yaml.safe_dump(
            {
                "rules": [
                    _rule("stat-notified", "NOTIFY", priority="stat", destinations=["pacs"]),
                    # storescu's AE title is no configured destination: the delivery is dead
                    _rule("undeliverable", "NOTIFYFAIL", destinations=["@sender"]),
                ]
            }
        )
    )
    webhook, fhir = Webhook(free_port(), fail_first=1), Fhir(free_port())
    node = start_node(
        tmp / "node",
        orthanc,
        router={"rules_dir": str(rules), "quiet_period_s": 0.5},
        dispatch={
            "backoff_s": 0.5,
            "backoff_max_s": 2.0,
            "max_attempts": 60,  # about 2 minutes before a receiver is given up
            "receivers": {
                "hook": {"url": f"http://127.0.0.1:{webhook.port}/airouter", "secret": SECRET},
                "ehr": {"kind": "fhir", "url": f"http://127.0.0.1:{fhir.port}/fhir"},
            },
        },
    )
    yield node, orthanc, webhook, fhir
    webhook.down()
    fhir.down()
    stop_process(node.process)
    stop_process(orthanc.process)
    assert "Traceback" not in node.log_text()


def _send(node: NodeProcess, out: Path, called: str) -> str:
    p = chest_phantom(slices=24, size=96)
    study, files = write_ct_series(
        p.hu, p.affine, out, patient_id=PATIENT_ID, patient_name=PATIENT_NAME
    )
    result = storescu(node.dimse_port, files, called)
    assert result.returncode == 0, result.stderr
    return study


def _job(node: NodeProcess, study: str, state: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        jobs = [j for j in node.get(f"/api/jobs?study={study}") or [] if j["state"] == state]
        return jobs[-1] if jobs else None

    return wait_for(find, 240, f"a {state} job for the study")  # type: ignore[no-any-return]


def _volumes_in_pacs(orthanc: Orthanc, study: str) -> dict[str, float]:
    """Tracking identifier -> volume (ml) of the SR that reached Orthanc (read by highdicom)."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study}})
    for instance in found or []:
        ds = pydicom.dcmread(io.BytesIO(http_bytes(f"{orthanc.url}/instances/{instance}/file")))
        if ds.Modality != "SR":
            continue
        kind = {
            Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
            ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
        }
        sr = kind[ds.SOPClassUID].from_dataset(ds)
        volumes = {}
        for group in sr.content.get_volumetric_roi_measurement_groups():
            [volume] = [m for m in group.get_measurements() if m.name == codes.SCT.Volume]
            volumes[group.tracking_identifier] = float(volume.value)
        return volumes
    raise AssertionError("no SR in Orthanc")


def test_receivers_get_one_notification_per_job_after_being_down(
    peers: tuple[NodeProcess, Orthanc, Webhook, Fhir], tmp_path: Path
) -> None:
    node, orthanc, webhook, fhir = peers
    stat_study = _send(node, tmp_path / "stat", "NOTIFY")
    failed_study = _send(node, tmp_path / "fail", "NOTIFYFAIL")
    done = _job(node, stat_study, "done")
    failed = _job(node, failed_study, "failed")
    assert done["priority"] == 300 and "@sender" in failed["error"]

    # both receivers down: the node keeps trying, several times each
    def notifications() -> list[dict[str, Any]]:
        jobs = [node.get(f"/api/jobs/{j['id']}") for j in (done, failed)]
        return [n for j in jobs for n in j["notifications"]]

    def tried() -> bool:
        """The first notification of each (job, receiver) failed twice; the ones after it
        wait their turn (a receiver hears of a job in order), never attempted."""
        rows, seen = notifications(), set()
        if len(rows) != 5:
            return False
        for job, r in zip((done["id"],) * 4 + (failed["id"],), rows, strict=True):
            first = (job, r["receiver"]) not in seen
            seen.add((job, r["receiver"]))
            if first and not (r["attempts"] >= 2 and r["state"] == "failed"):
                return False
            if not first and not (r["attempts"] == 0 and r["state"] == "pending"):
                raise AssertionError(f"sent out of order: {rows}")
        return True

    wait_for(tried, 60, "two failed attempts of the first notification to each receiver")
    assert webhook.received == [] and fhir.received == []
    webhook.up()
    fhir.up()

    def delivered() -> bool:
        return all(r["state"] == "sent" for r in notifications())

    try:
        wait_for(delivered, 60, "every notification sent")
    except TimeoutError:
        raise AssertionError(
            f"not all sent: {notifications()}; refused: {webhook.refused}, {fhir.refused}"
        ) from None
    rows = notifications()
    time.sleep(2)  # a few more passes: nothing is sent twice
    assert webhook.refused == [] and fhir.refused == []

    # the webhook: one per (job, event); the 503 it answered first was retried
    events = sorted((p["job"]["id"], p["event"]) for p in webhook.received)
    assert events == sorted(
        [(done["id"], "stat_finding"), (done["id"], "done"), (failed["id"], "failed")]
    )
    assert {r["receiver"] for r in rows} == {"hook", "ehr"}
    bodies = json.dumps(webhook.received)
    assert PATIENT_ID not in bodies and "Notified" not in bodies  # phi: false
    by_event = {p["event"]: p for p in webhook.received}
    assert by_event["failed"]["job"]["error"] == failed["error"]
    assert by_event["done"]["study"]["study_instance_uid"] == stat_study
    sent = {o["sop_instance_uid"] for o in done["outputs"]}
    assert {o["sop_instance_uid"] for o in by_event["done"]["outputs"]} == sent
    volumes = _volumes_in_pacs(orthanc, stat_study)
    assert set(volumes) == {"ct-body:Body", "ct-lungs:Right Lung", "ct-lungs:Left Lung"}
    told = {
        group["structure"]: m["value"]
        for group in by_event["done"]["results"]
        for m in group["measurements"]
        if m["name"] == {"code": "118565006", "scheme": "SCT", "meaning": "Volume"}
    }
    assert told == pytest.approx(volumes, rel=1e-6)
    assert webhook.fail_first == 0  # its 503 was answered, and the notification sent again

    # FHIR: the STAT finding's preliminary report, then the final one (failed: not subscribed)
    assert [b["entry"][0]["resource"]["status"] for b in fhir.received] == ["preliminary", "final"]
    reports = [r for url, r in fhir.resources.items() if url.startswith("DiagnosticReport")]
    assert len(reports) == 1  # the final replaced the preliminary (same identifier)
    [report] = reports
    assert report["status"] == "final"
    assert report["subject"]["identifier"]["value"] == PATIENT_ID
    [study_ref] = report["imagingStudy"]
    assert study_ref["identifier"] == {"system": "urn:dicom:uid", "value": f"urn:oid:{stat_study}"}
    observations = {url: r for url, r in fhir.resources.items() if url.startswith("Observation")}
    final = fhir.received[-1]
    refs = {e["fullUrl"] for e in final["entry"][1:]}
    assert {r["reference"] for r in final["entry"][0]["resource"]["result"]} == refs
    got = {
        o["bodySite"]["text"]: o["valueQuantity"]["value"]
        for o in observations.values()
        if o["code"]["coding"][0]["code"] == "118565006"  # SNOMED CT Volume
    }
    assert got == pytest.approx(volumes, rel=1e-6)
    assert all(o["status"] == "final" for o in observations.values())
    assert all(
        o["valueQuantity"]["system"] == "http://unitsofmeasure.org" for o in observations.values()
    )
