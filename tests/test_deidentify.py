"""Off-site models, end to end: de-identified on the way out, re-identified on the way back.

The node forwards CTs to an off-site AI service (DCMTK ``storescp`` as ``OFFSITE``, a
destination marked ``deidentify``) and SEGs to the PACS (Orthanc). The CT sent carries the
source's identity everywhere a careless copy would keep it: the patient module, a second
patient ID in a sequence, the accession number in the request attributes, comments, a study
description, a private attribute.

- Every byte of every copy that reaches the off-site service is searched for the source's
  patient name, ID, birth date, accession number and institution, and for the original UIDs:
  none is there; the pixels are the original's.
- The off-site service's answer (a highdicom SEG built on the copies it got, so it references
  the pseudonymous study, series, instances and frame of reference) is sent back to the node;
  Orthanc receives it under the original patient and study, referencing the original CT.
- A series whose Burned In Annotation is YES never leaves: its deliveries are dead with the
  reason, and an operator's retry is refused too.
"""

from __future__ import annotations

import io
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from airouter.core.spool import instance_path
from tests.peers import (
    NodeProcess,
    Orthanc,
    free_port,
    fresh_copy,
    head_ct_files,
    http_bytes,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    tool,
    wait_for,
)

pytestmark = pytest.mark.integration
SLICES = 24
NAME, PATIENT_ID, BIRTH = "VAN DER BERG^JOHANNA", "MRN4711", "19610412"
ACCESSION, INSTITUTION = "ACC88231", "ST ELSEWHERE HOSPITAL"
NEEDLES = ["VAN DER BERG", "JOHANNA", PATIENT_ID, BIRTH, ACCESSION, "ELSEWHERE"]


class Peers:
    def __init__(self, node: NodeProcess, orthanc: Orthanc, offsite: Path, ct: list[Path]):
        self.node, self.orthanc, self.offsite, self.ct = node, orthanc, offsite, ct

    def received(self) -> list[Path]:
        """What the off-site service has received so far."""
        return sorted(p for p in self.offsite.iterdir() if p.is_file())


def identified(files: list[Path], burned_in: str = "NO") -> None:
    """Put the source's identity everywhere a copy could keep it."""
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH
        ds.IssuerOfPatientID = "ELSEWHERE-MRN"
        ds.AccessionNumber, ds.InstitutionName = ACCESSION, INSTITUTION
        ds.InstitutionAddress = "1 Elsewhere Road"
        ds.ReferringPhysicianName = "HOUSE^GREGORY"
        ds.StudyDescription = f"CT head {INSTITUTION}"
        ds.ImageComments = f"Johanna van der Berg {PATIENT_ID} follow-up"
        other = Dataset()
        other.PatientID, other.IssuerOfPatientID = PATIENT_ID, "ELSEWHERE-MRN"
        ds.OtherPatientIDsSequence = [other]
        request = Dataset()
        request.AccessionNumber, request.RequestedProcedureID = ACCESSION, "RP-1"
        request.ScheduledProcedureStepDescription = f"head CT for {NAME}"
        ds.RequestAttributesSequence = [request]
        block = ds.private_block(0x0029, "ACME HIS 1.0", create=True)
        block.add_new(0x10, "LO", NAME)
        ds.BurnedInAnnotation = burned_in
        ds.save_as(path)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    tmp = tmp_path_factory.mktemp("deidentify")
    orthanc = start_orthanc(tmp / "orthanc")
    offsite, port = tmp / "offsite", free_port()
    offsite.mkdir()
    # the off-site AI service's receiver (TCP_NODELAY: Debian DCMTK stalls without it)
    receiver = subprocess.Popen(
        [tool("storescp"), "-aet", "OFFSITE", "+xa", "-od", str(offsite), str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    rules = tmp / "rules"
    rules.mkdir()
    forward = {"orientation": None, "exclude_image_types": []}
    (rules / "offsite.yaml").write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {
                        "name": "ct-to-offsite-ai",
                        "action": "forward",
                        "match": {"Modality": "CT"},
                        "destinations": ["offsite"],
                    },
                    {
                        "name": "offsite-results-to-pacs",
                        "action": "forward",
                        "match": {"Modality": "SEG"},
                        "select": forward,
                        "destinations": ["pacs"],
                    },
                ]
            }
        )
    )
    offsite_node = {
        "ae_title": "OFFSITE",
        "host": "127.0.0.1",
        "port": port,
        "deidentify": {"seed": "a-site-secret-for-pseudonyms"},
    }
    node = start_node(
        tmp / "node",
        orthanc,
        wait_triton=False,
        router={"rules_dir": str(rules), "quiet_period_s": 1.0},
        dispatch={"destinations": {"offsite": offsite_node}},
    )
    ct = fresh_copy(head_ct_files()[:SLICES], tmp / "ct")
    identified(ct)
    try:
        yield Peers(node, orthanc, offsite, ct)
    finally:
        stop_process(node.process)
        stop_process(receiver)
        stop_process(orthanc.process)


def _jobs(node: NodeProcess, study: str) -> list[dict[str, Any]]:
    return list(node.get(f"/api/jobs?study={study}") or [])


def _texts(ds: Dataset) -> Iterator[tuple[str, str]]:
    """(keyword, value as text) of every element, sequences, private and file meta too."""
    for element in [*getattr(ds, "file_meta", []), *ds]:
        if element.VR == "SQ":
            for item in element.value:
                yield from _texts(item)
        elif element.tag != 0x7FE00010:
            value = element.value
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            yield element.keyword or str(element.tag), text


@pytest.fixture(scope="module")
def sent(peers: Peers) -> list[Path]:
    """The CT through the node: the copies the off-site service received."""
    result = storescu(peers.node.dimse_port, peers.ct)
    assert result.returncode == 0, result.stderr
    study = str(pydicom.dcmread(peers.ct[0], stop_before_pixels=True).StudyInstanceUID)

    def delivered() -> bool:  # each copy acknowledged by the receiver: its file is whole
        jobs = _jobs(peers.node, study)
        rows = [d for j in jobs for o in j["outputs"] for d in o["deliveries"]]
        return len(rows) == SLICES and all(d["state"] == "sent" for d in rows)

    wait_for(delivered, 90, "the off-site copies")
    return peers.received()


def test_the_offsite_copy_holds_no_identity(peers: Peers, sent: list[Path]) -> None:
    originals = [pydicom.dcmread(p) for p in peers.ct]
    original_uids = {str(ds.SOPInstanceUID) for ds in originals}
    original_uids |= {str(originals[0].StudyInstanceUID), str(originals[0].SeriesInstanceUID)}
    original_uids.add(str(originals[0].FrameOfReferenceUID))
    assert len(sent) == SLICES
    pixels = {ds.ImagePositionPatient[2]: ds.pixel_array for ds in originals}
    studies = set()
    for path in sent:
        raw = path.read_bytes()
        for needle in [*NEEDLES, *original_uids]:
            assert needle.encode() not in raw, f"{needle!r} left in {path.name}"
        copy = pydicom.dcmread(path)
        for keyword, text in _texts(copy):
            for needle in NEEDLES:
                assert needle.lower() not in text.lower(), f"{needle!r} in {keyword}"
        assert not any(e.tag.is_private for e in copy), "a private attribute left"
        assert "OtherPatientIDsSequence" not in copy and "RequestAttributesSequence" not in copy
        assert copy.PatientIdentityRemoved == "YES"
        methods = {item.CodeValue for item in copy.DeidentificationMethodCodeSequence}
        assert methods == {"113100", "113107"}  # Basic Profile, dates shifted
        assert copy.StudyDate != originals[0].StudyDate  # shifted, the same for every copy
        studies.add((copy.StudyInstanceUID, copy.StudyDate, str(copy.PatientID)))
        assert np.array_equal(copy.pixel_array, pixels[copy.ImagePositionPatient[2]])
    assert len(studies) == 1  # one pseudonymous study, consistently
    [job] = _jobs(peers.node, str(originals[0].StudyInstanceUID))
    sent_rows = [d for o in job["outputs"] for d in o["deliveries"]]
    assert len(sent_rows) == SLICES and {d["state"] for d in sent_rows} == {"sent"}


def _offsite_seg(copies: list[Path], out: Path) -> Path:
    """What the off-site AI answers: a SEG on the images it got (their UIDs, their patient)."""
    images = sorted(
        (pydicom.dcmread(p) for p in copies), key=lambda ds: float(ds.ImagePositionPatient[2])
    )
    mask = np.zeros((len(images), images[0].Rows, images[0].Columns), dtype=bool)
    mask[4:12, 200:300, 220:320] = True
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Brain",
        segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Brain,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="OffsiteBrain", version="3.1", family=codes.DCM.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=images,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Offsite AI Ltd",
        manufacturer_model_name="OffsiteBrain",
        software_versions="3.1",
        device_serial_number="0001",
        omit_empty_frames=True,
    )
    path = out / "offsite-seg.dcm"
    seg.save_as(path)
    return path


def _referenced(ds: Dataset) -> set[str]:
    """Every Referenced SOP Instance UID anywhere in ``ds``."""
    found = set()
    for element in ds.iterall():
        if element.keyword == "ReferencedSOPInstanceUID":
            found.add(str(element.value))
    return found


def test_the_result_comes_back_under_the_original_patient(
    peers: Peers, sent: list[Path], tmp_path: Path
) -> None:
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in peers.ct]
    first = originals[0]
    seg_path = _offsite_seg(sent, tmp_path)
    seg = pydicom.dcmread(seg_path)
    assert seg.StudyInstanceUID != first.StudyInstanceUID  # it answers the pseudonyms
    result = storescu(peers.node.dimse_port, [seg_path], "AIROUTER", "-R", aet="OFFSITE")
    assert result.returncode == 0, result.stderr

    def in_pacs() -> list[str]:
        return list(
            peers.orthanc.post("/tools/find", {"Level": "Instance", "Query": {"Modality": "SEG"}})
        )

    [instance] = wait_for(in_pacs, 90, "the re-identified SEG in Orthanc")
    back = pydicom.dcmread(io.BytesIO(http_bytes(f"{peers.orthanc.url}/instances/{instance}/file")))
    assert str(back.PatientName) == NAME and back.PatientID == PATIENT_ID
    assert back.PatientBirthDate == BIRTH and back.AccessionNumber == ACCESSION
    assert back.StudyInstanceUID == first.StudyInstanceUID
    assert back.StudyDate == first.StudyDate and back.StudyID == first.StudyID
    assert back.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert "PatientIdentityRemoved" not in back and "DeidentificationMethod" not in back
    [series] = back.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    # the referenced series lists every source image; each frame cites its own slice
    assert _referenced(back) == {str(ds.SOPInstanceUID) for ds in originals}
    by_position = {float(ds.ImagePositionPatient[2]): str(ds.SOPInstanceUID) for ds in originals}
    for frame in back.PerFrameFunctionalGroupsSequence:
        z = float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
        assert _referenced(frame) == {by_position[z]}
    assert len(back.PerFrameFunctionalGroupsSequence) == 8  # the slices the mask covers
    # its own identity stays the off-site system's (no pseudonym of ours)
    assert back.SOPInstanceUID == seg.SOPInstanceUID
    assert back.SeriesInstanceUID == seg.SeriesInstanceUID
    assert back.SegmentSequence[0].SegmentLabel == "Brain"
    # nothing of the pseudonymous study reached the PACS or the node's index
    studies = peers.orthanc.get("/studies?expand")
    assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == [first.StudyInstanceUID]
    assert _jobs(peers.node, str(seg.StudyInstanceUID)) == []
    assert "re-identified an arrival" in peers.node.log_text()


def _post(node: NodeProcess, path: str) -> Any:
    request = urllib.request.Request(node.url + path, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status


def test_burned_in_annotations_never_leave(peers: Peers, sent: list[Path], tmp_path: Path) -> None:
    before = len(peers.received())
    files = fresh_copy(head_ct_files()[:4], tmp_path / "burned")
    identified(files, burned_in="YES")
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(peers.node.dimse_port, files).returncode == 0

    def dead() -> list[dict[str, Any]]:
        jobs = _jobs(peers.node, study)
        rows = jobs and peers.node.get(f"/api/deliveries?job={jobs[0]['id']}")
        return rows if rows and all(r["state"] == "dead" for r in rows) else []

    rows = wait_for(dead, 60, "the burned-in series refused")
    assert len(rows) == 4
    assert all("Burned In Annotation is YES" in r["last_status"] for r in rows)
    assert _post(peers.node, f"/api/deliveries/{rows[0]['id']}/retry") == 200

    def refused_again() -> dict[str, Any] | None:
        [row] = [r for r in peers.node.get(f"/api/deliveries?job={rows[0]['job_id']}") or []
                 if r["id"] == rows[0]["id"]]  # fmt: skip
        done = row["state"] == "dead" and row["attempts"] > rows[0]["attempts"]
        return row if done else None

    row = wait_for(refused_again, 30, "the retry refused")
    assert "de-identified copies only" in row["last_status"]
    assert len(peers.received()) == before  # nothing of it left


def test_an_answer_in_a_study_of_its_own_joins_the_original_study(
    peers: Peers, sent: list[Path], tmp_path: Path
) -> None:
    """An off-site system that answers in a new study (its own Study Instance UID) but
    references the copies it got: from the off-site destination's AE title, the answer is
    recognised by what it references and stored re-identified, in the original study (the
    node's own copy is read: the forwarding rule already sent this study's SEG series)."""
    first = pydicom.dcmread(peers.ct[0], stop_before_pixels=True)
    path = _offsite_seg(sent, tmp_path)
    seg = pydicom.dcmread(path)
    seg.StudyInstanceUID = hd.UID()  # the vendor's own study
    seg.save_as(path)
    result = storescu(peers.node.dimse_port, [path], "AIROUTER", "-R", aet="OFFSITE")
    assert result.returncode == 0, result.stderr
    stored = instance_path(
        peers.node.data_dir / "spool",
        str(first.StudyInstanceUID),
        str(seg.SeriesInstanceUID),
        str(seg.SOPInstanceUID),
    )
    assert stored.exists()  # acknowledged: durable, under the original study
    back = pydicom.dcmread(stored)
    assert back.StudyInstanceUID == first.StudyInstanceUID
    assert back.PatientID == PATIENT_ID and str(back.PatientName) == NAME
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in peers.ct}
    assert _referenced(back) == originals
    assert not instance_path(
        peers.node.data_dir / "spool",
        str(seg.StudyInstanceUID),
        str(seg.SeriesInstanceUID),
        str(seg.SOPInstanceUID),
    ).exists()
