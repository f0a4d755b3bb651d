"""STOW-RS against the real ingest and index (FastAPI test client, no network)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from airouter.app.web import create_app
from airouter.core.db import Store
from airouter.core.tracker import AssociationTracker
from router.completion import CompletionMonitor, CompletionPolicy
from scp.ingest import Ingest
from tests.peers import SHARED_DICOM, head_ct_files


class Api:
    def __init__(self, tmp: Path, database_url: str | None = None) -> None:
        self.store = Store(database_url or f"sqlite:///{tmp / 'db.sqlite'}")
        self.tracker = AssociationTracker()
        self.ingest = Ingest(self.store, tmp / "spool")
        self.client = TestClient(create_app(self.store, dict, self.ingest, self.tracker))

    def stow(self, parts: list[tuple[str, bytes]], path: str = "/dicomweb/studies"):  # type: ignore[no-untyped-def]
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
                for ctype, data in parts
            )
            + f"--{boundary}--\r\n".encode()
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        }
        return self.client.post(path, content=body, headers=headers)


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    """STOW-RS on the state store on SQLite and on PostgreSQL."""
    yield Api(tmp_path, database_url)


def _split_multipart(response) -> list[bytes]:  # type: ignore[no-untyped-def]
    boundary = response.headers["content-type"].split("boundary=")[1].encode()
    chunks = response.content.split(b"--" + boundary)[1:-1]
    return [c.split(b"\r\n\r\n", 1)[1][:-2] for c in chunks]


def test_stored_instances_are_referenced_and_retrievable_byte_identical(api: Api) -> None:
    files = head_ct_files()[:3]
    data = [f.read_bytes() for f in files]
    response = api.stow([("application/dicom", d) for d in data])
    assert response.status_code == 200, response.text
    body = response.json()
    assert "00081198" not in body
    refs = body["00081199"]["Value"]
    assert [r["00081155"]["Value"][0] for r in refs] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files
    ]
    for ref, original in zip(refs, data, strict=True):
        url = ref["00081190"]["Value"][0].split("/dicomweb", 1)[1]
        got = api.client.get("/dicomweb" + url)
        assert got.status_code == 200
        assert _split_multipart(got) == [original]
    again = api.stow([("application/dicom", data[0])])  # idempotent
    assert again.status_code == 200


def test_non_dicom_parts_fail_with_a_reason_and_the_rest_is_stored(api: Api) -> None:
    nrrd = (SHARED_DICOM / "seg-vendor").rglob("slicer.seg.dcm").__next__().read_bytes()
    ct = head_ct_files()[0].read_bytes()
    response = api.stow(
        [("application/dicom", nrrd), ("application/dicom", ct), ("text/plain", b"hello")]
    )
    assert response.status_code == 202
    failed = response.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"][0] for f in failed] == [0xC000, 0xC000]
    assert len(response.json()["00081199"]["Value"]) == 1
    assert api.stow([("application/dicom", b"not dicom")]).status_code == 409


def test_instance_of_another_study_is_refused_on_a_study_url(api: Api) -> None:
    ct = head_ct_files()[0].read_bytes()
    response = api.stow([("application/dicom", ct)], "/dicomweb/studies/1.2.3.4")
    assert response.status_code == 409
    assert "differs" in response.json()["00081198"]["Value"][0]["00000902"]["Value"][0]


def test_missing_study_uid_is_a_failure_not_a_crash(api: Api, tmp_path: Path) -> None:
    ds = pydicom.dcmread(head_ct_files()[0])
    ds.StudyInstanceUID = ""
    ds.save_as(tmp_path / "x.dcm")
    response = api.stow([("application/dicom", (tmp_path / "x.dcm").read_bytes())])
    assert response.status_code == 409
    reason = response.json()["00081198"]["Value"][0]
    assert reason["00081197"]["Value"] == [0xC000]
    assert reason["00000902"]["Value"] == ["StudyInstanceUID is missing or empty"]


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 415),
        ('multipart/related; type="image/jpeg"; boundary=x', 415),
        ('multipart/related; type="application/dicom"', 400),
    ],
)
def test_unusable_requests_get_a_json_error(api: Api, content_type: str, status: int) -> None:
    response = api.client.post(
        "/dicomweb/studies", content=b"x", headers={"Content-Type": content_type}
    )
    assert response.status_code == status
    assert response.json()["status"] == status and response.json()["error"]


def test_a_stow_request_is_one_unit_for_completion(api: Api) -> None:
    routed: list[str] = []
    monitor = CompletionMonitor(
        api.store,
        api.tracker,
        CompletionPolicy(quiet_period_s=0.0),
        lambda s, uid: routed.append(uid),
    )
    api.stow([("application/dicom", f.read_bytes()) for f in head_ct_files()[:2]])
    assert monitor.check() == [pydicom.dcmread(head_ct_files()[0]).StudyInstanceUID]


def test_foreign_hosts_and_cross_origin_writes_are_refused(tmp_path: Path) -> None:
    """DNS rebinding (a page whose name resolves to us) and CSRF (another site's page posting
    to us): the Host must be one we serve; a browser's state-changing request must come from
    our own origin. Scripts and PACS send no Origin and pass."""
    from fastapi.testclient import TestClient

    from airouter.app.web import create_app
    from airouter.core.settings import HttpSettings

    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    hosts = HttpSettings(allowed_hosts=["airouter.hospital"]).served_hosts()
    assert hosts is not None and {"localhost", "127.0.0.1", "airouter.hospital"} <= hosts
    client = TestClient(create_app(store, lambda: {"status": "ok"}, hosts=hosts))
    ours = {"host": "127.0.0.1:8080"}
    assert client.get("/api/health", headers=ours).status_code == 200
    assert client.get("/api/health", headers={"host": "AIROUTER.hospital"}).status_code == 200
    for path in ("/api/health", "/dicomweb/studies", "/docs", "/openapi.json"):
        refused = client.get(path, headers={"host": "attacker.example:8080"})
        assert refused.status_code == 400 and "attacker.example" in refused.json()["error"]
    cross = client.post(
        "/api/deliveries/1/retry", headers={**ours, "origin": "http://attacker.example"}
    )
    assert cross.status_code == 403 and cross.json()["status"] == 403
    assert client.post("/api/jobs/1/cancel", headers={**ours, "origin": "null"}).status_code == 403
    same = client.post("/api/jobs/1/cancel", headers={**ours, "origin": "http://127.0.0.1:8080"})
    assert same.status_code == 404  # reached the API: there is no job 1
    assert client.post("/api/jobs/1/cancel", headers=ours).status_code == 404  # no Origin
    assert HttpSettings(allowed_hosts=["*"]).served_hosts() is None


def _body(parts: list[bytes], boundary: str, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    return (
        preamble
        + b"".join(
            f"--{boundary}  \r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
            for p in parts
        )
        + f"--{boundary}--\r\n".encode()
        + epilogue
    )


def test_the_body_is_split_into_part_files_however_it_is_chunked(tmp_path: Path) -> None:
    """A delimiter may straddle two chunks, a part may hold CRLF and dashes, a preamble and
    an epilogue are ignored, transport padding after a delimiter is allowed (RFC 2046 5.1.1)."""
    import random

    from scp.stow import PartWriter

    boundary = "b0und4ry"
    parts = [
        b"",
        b"\r\n--b0und\r\n--b0und4r",  # prefixes of the delimiter inside the content
        bytes(range(256)) * 40,
        b"x\r\n",
    ]
    body = _body(parts, boundary, preamble=b"preamble\r\n", epilogue=b"epilogue --b0und4ry\r\n")
    rng = random.Random(7)
    for trial in range(40):
        writer = PartWriter(boundary, tmp_path / f"t{trial}", limit=1 << 20)
        at = 0
        while at < len(body):
            step = rng.choice([1, 2, 3, 7, 13, 64, 1000, 5000])
            writer.feed(body[at : at + step])
            at += step
        got = writer.finish()
        assert [p.path.read_bytes() for p in got] == parts
        assert all(p.complete for p in got)
        assert got[0].headers == {"content-type": "application/dicom"}
        writer.discard()
        assert not list((tmp_path / f"t{trial}").iterdir())


def test_limits_and_malformed_bodies_give_clear_statuses(tmp_path: Path) -> None:
    from scp.stow import PartWriter, StowError

    writer = PartWriter("xx", tmp_path, limit=100)
    writer.feed(b"--xx\r\n\r\n" + bytes(80))
    with pytest.raises(StowError) as too_large:
        writer.feed(bytes(30))
    assert too_large.value.status == 413
    writer.discard()
    assert not list(tmp_path.iterdir())  # the part being written is removed too

    writer = PartWriter("xx", tmp_path, limit=1 << 20)
    with pytest.raises(StowError) as endless:
        writer.feed(b"--xx\r\nContent-Type: " + b"a" * (17 << 10))
    assert endless.value.status == 400 and "headers" in str(endless.value)

    writer = PartWriter("xx", tmp_path, limit=1 << 20)
    writer.feed(b"no delimiter at all")
    with pytest.raises(StowError) as none:
        writer.finish()
    assert none.value.status == 400


def test_a_body_cut_off_inside_a_part_stores_the_parts_before_it(api: Api) -> None:
    first, second = (f.read_bytes() for f in head_ct_files()[:2])
    body = _body([first], "cut")
    body = body[: -len(b"--cut--\r\n")] + b"--cut\r\nContent-Type: application/dicom\r\n\r\n"
    body += second[: len(second) // 2]  # the sender stopped here
    response = api.client.post(
        "/dicomweb/studies",
        content=body,
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=cut'},
    )
    assert response.status_code == 202, response.text
    (failed,) = response.json()["00081198"]["Value"]
    assert failed["00000902"]["Value"] == ["the request ended inside this part"]
    assert len(response.json()["00081199"]["Value"]) == 1
    # stored, refused, cut off or duplicate: nothing is left in the incoming folder
    api.stow([("application/dicom", first), ("application/dicom", b"junk")])
    assert not list(api.ingest.incoming_dir.iterdir())
