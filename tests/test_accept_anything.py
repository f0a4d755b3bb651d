"""Every file under shared ts-* and odd/ through DIMSE (DCMTK storescu, pynetdicom) and STOW-RS.

Each file gets a success or a documented failure; after the run the node still answers C-ECHO
and every acknowledged instance is retrievable by WADO-RS with its data set unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from airouter.app.web import create_app
from tests.objects import dataset_bytes
from tests.peers import SHARED_DICOM, tool
from tests.test_scp import Node, _send
from tests.test_stow import Api, _split_multipart

FILES = sorted(p for d in SHARED_DICOM.glob("ts-*") for p in d.rglob("*") if p.is_file()) + sorted(
    p for p in (SHARED_DICOM / "odd").rglob("*") if p.is_file()
)
# storescu (DCMTK 3.6.7) proposes a compressed transfer syntax only when told to.
STORESCU_FLAG = {
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
# What the node may answer instead of success (PS3.4 C-STORE statuses, as storescu names them)
DOCUMENTED_DIMSE = {
    "Error: CannotUnderstand",
    "Refused: OutOfResources",
    "Error: DataSetDoesNotMatchSOPClass",
}
DOCUMENTED_STOW = {0xA700, 0xA900, 0xC000, 0x0110}


def _meta(path: Path) -> pydicom.Dataset | None:
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    # A valid C-STORE request needs the SOP Class and Instance UIDs (the file meta gives them)
    needed = ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID")
    return meta if all(meta.get(k) for k in needed) else None


def _elements(ds: pydicom.Dataset) -> dict:
    """Elements to compare after a DCMTK re-encoding: group lengths and the trailing padding
    (FFFC,FFFC), which senders may drop (PS3.5 7.2, PS3.10 7.2), are left out."""
    return {e.tag: e.value for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("anything"))
    yield n
    n.server.shutdown()


def _retrieve(client: TestClient, study: str, series: str, sop: str) -> bytes:
    response = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}")
    assert response.status_code == 200, (sop, response.text)
    (part,) = _split_multipart(response)
    return part


def test_every_file_through_dimse(node: Node) -> None:
    wado = TestClient(create_app(node.store, dict))
    outcomes: Counter[str] = Counter()
    first_file: dict[str, Path] = {}  # a SOP Instance UID is stored once: the first file wins
    for path in FILES:
        meta = _meta(path)
        flag = STORESCU_FLAG.get(str(meta.TransferSyntaxUID), "-x=") if meta else "-x="
        result = subprocess.run(
            [
                tool("storescu"),
                "-v",
                "-R",
                flag,
                "-aec",
                "AIROUTER",
                "127.0.0.1",
                str(node.port),
                str(path),
            ],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = result.stdout + result.stderr
        response = re.search(r"Received Store Response \((.+?)\)", out)
        if response and response.group(1) == "Success":
            outcome = "stored by storescu"
        elif response:
            assert response.group(1) in DOCUMENTED_DIMSE, (path, response.group(1))
            outcome = f"refused: {response.group(1)}"
        elif meta is not None:
            # storescu cannot send it as stored (no proposal for its syntax, or it cannot parse
            # it); pynetdicom sends the file's data set bytes as they are.
            status = int(_send(node.port, path).Status)
            assert status in (0x0000, 0xA700, 0xA900, 0xC210, 0xC211), (path, hex(status))
            outcome = "stored by pynetdicom" if status == 0 else f"refused by node 0x{status:04X}"
        else:
            outcome = "no valid C-STORE request can be made of it"
        outcomes[outcome] += 1
        if outcome.startswith("stored"):
            sop = str(meta.MediaStorageSOPInstanceUID) if meta else None
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            sop = str(ds.get("SOPInstanceUID") or sop)
            first_file.setdefault(sop, path)
            if first_file[sop] != path:
                continue  # a duplicate SOP Instance UID: the first is kept
            stored = _retrieve(wado, ds.StudyInstanceUID, ds.SeriesInstanceUID, sop)
            if outcome == "stored by pynetdicom":
                assert stored.endswith(dataset_bytes(path.read_bytes())), path  # byte for byte
            else:  # DCMTK re-encodes what it sends: compare element by element
                back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(stored), force=True)
                assert _elements(back) == _elements(pydicom.dcmread(path, force=True)), path
    print("\nDIMSE outcomes:", dict(outcomes))
    assert outcomes["stored by storescu"] + outcomes["stored by pynetdicom"] >= 100
    echo = subprocess.run(
        [tool("echoscu"), "-aec", "AIROUTER", "127.0.0.1", str(node.port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        check=False,
    )
    assert echo.returncode == 0


def test_every_file_through_stow(tmp_path: Path) -> None:
    api = Api(tmp_path)
    outcomes: Counter[str] = Counter()
    first_file: dict[str, Path] = {}
    for path in FILES:
        response = api.stow([("application/dicom", path.read_bytes())])
        body = response.json()
        if "00081199" in body:
            assert response.status_code == 200
            ref = body["00081199"]["Value"][0]
            sop = ref["00081155"]["Value"][0]
            first_file.setdefault(sop, path)
            outcomes["stored"] += 1
            if first_file[sop] == path:
                url = ref["00081190"]["Value"][0].split("/dicomweb", 1)[1]
                got = api.client.get("/dicomweb" + url)
                assert _split_multipart(got) == [path.read_bytes()], path
        else:
            assert response.status_code == 409
            failure = body["00081198"]["Value"][0]
            reason = failure["00081197"]["Value"][0]
            assert reason in DOCUMENTED_STOW, (path, hex(reason))
            assert failure["00000902"]["Value"][0]  # a reason a person can read
            outcomes[f"failed 0x{reason:04X}"] += 1
    print("\nSTOW outcomes:", dict(outcomes))
    assert outcomes["stored"] >= 100
