"""Input quality checks before inference (a rule's ``qc:``): on variants of the shared head CT
made here (a slice left out, irregular spacing, a field of view cropped through the skull, a
wrong rescale, a gantry tilt, a duplicated slice), checked directly and through a running node
whose rules reject (with and without a report) or warn."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from airouter.core.qc import QualityChecks
from airouter.jobs.qc import check_volume
from inference.volume import build_volume
from tests.peers import (
    NodeProcess,
    Orthanc,
    head_ct_files,
    http_bytes,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    wait_for,
)

ALL_CHECKS = QualityChecks(
    action="reject",
    missing_slices=True,
    duplicate_slices=True,
    spacing_tolerance_mm=0.2,
    max_tilt_deg=5,
    pixel_spacing_mm={"min": 0.3, "max": 1.5},
    slice_thickness_mm={"max": 5},
    air_hu={"min": -1100, "max": -900},
    max_truncated_slices=0,
    images={"min": 10, "max": 1000},
)


def contiguous_head(count: int = 30, start: int = 50) -> list[pydicom.Dataset]:
    """``count`` neighbouring slices of the head CT, in position order (the file names are
    not in that order)."""
    images = [pydicom.dcmread(f) for f in head_ct_files()]
    images.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return images[start : start + count]


def write_variant(kind: str, out: Path, description: str = "QC test") -> list[Path]:
    """The head CT as one new series (new UIDs), changed as ``kind`` says."""
    images = contiguous_head()
    study, series = generate_uid(), generate_uid()
    if kind == "missing":
        del images[12]
    elif kind == "duplicate":
        extra = pydicom.dcmread(io.BytesIO(_bytes(images[7])))
        images.insert(8, extra)
    for k, ds in enumerate(images):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = description
        if kind == "irregular" and k >= 15:
            position = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [*position[:2], position[2] + 0.5]
        elif kind == "truncated":  # a 200 x 200 field of view in the middle: cuts the skull
            pixels = ds.pixel_array[150:350, 150:350]
            position = [float(v) for v in ds.ImagePositionPatient]
            row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
            ds.ImagePositionPatient = [
                position[0] + 150 * col_mm,
                position[1] + 150 * row_mm,
                position[2],
            ]
            ds.Rows, ds.Columns = pixels.shape
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        elif kind == "rescale":  # a rescale intercept lost on the way: air at about 0
            ds.RescaleIntercept = 0
        elif kind == "tilted":
            t = np.radians(12.0)
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t))]
    paths = []
    out.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(images):
        path = out / f"{k:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("kind", "failed"),
    [
        ("clean", set()),
        ("missing", {"missing_slices"}),
        ("irregular", {"slice_spacing"}),
        ("truncated", {"truncated_fov"}),
        # raw pixel values taken for HU: no air, and "tissue" all along the border
        ("rescale", {"air_hu", "truncated_fov"}),
        ("tilted", {"tilt"}),
        ("duplicate", {"duplicate_slices"}),
    ],
)
def test_each_check_fails_on_its_variant_and_only_there(
    kind: str, failed: set[str], tmp_path: Path
) -> None:
    files = write_variant(kind, tmp_path)
    volume = build_volume(files, drop_duplicates=True)
    findings = check_volume(volume, ALL_CHECKS)
    assert {f.check for f in findings} == failed, [f.describe() for f in findings]
    for finding in findings:  # the value found is said, not just the check's name
        assert any(ch.isdigit() for ch in finding.value), finding.describe()


def test_images_pixel_spacing_and_thickness_ranges() -> None:
    volume = build_volume(
        [p for p in head_ct_files()[:5]]  # 5 images of 0.45 mm pixels, 1 mm thick
    )
    checks = QualityChecks(
        images={"min": 10},
        pixel_spacing_mm={"min": 0.5},
        slice_thickness_mm={"min": 2, "max": 5},
    )
    found = {f.check: f.value for f in check_volume(volume, checks)}
    assert found == {
        "images": "5",
        "pixel_spacing_mm": "0.451172x0.451172",
        "slice_thickness_mm": "1",
    }


# --- through a running node -------------------------------------------------------------------

RULES = {
    "rules": [
        {
            "name": f"qc-{name}",
            "match": {"Modality": "CT", "SeriesDescription": f"QC {name}"},
            "select": {"min_instances": 5},
            "models": ["ct-body", "ct-lungs"],
            "outputs": ["SEG", "SR", "RTSTRUCT"],
            "destinations": ["pacs"],
            "template": "tg263",
            "qc": {
                "action": action,
                "report": report,
                "missing_slices": True,
                "spacing_tolerance_mm": 0.2,
                "max_truncated_slices": 0,
            },
        }
        for name, action, report in (
            ("report", "reject", True),
            ("reject", "reject", False),
            ("warn", "warn", False),
        )
    ]
}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield pacs
    stop_process(pacs.process)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[NodeProcess]:
    work = tmp_path_factory.mktemp("node")
    rules = work / "rules"
    rules.mkdir()
    (rules / "qc.yaml").write_text(yaml.safe_dump(RULES))
    n = start_node(work, orthanc, router={"rules_dir": str(rules), "quiet_period_s": 1.0})
    yield n
    stop_process(n.process)


def _job(node: NodeProcess, study_uid: str, states: tuple[str, ...]) -> dict:
    return wait_for(
        lambda: next(
            (j for j in node.get(f"/api/jobs?study={study_uid}") or [] if j["state"] in states),
            None,
        ),
        180,
        f"the job of {study_uid} to be {' or '.join(states)}",
    )


def _in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, pydicom.Dataset]:
    found = {}
    for series in orthanc.get("/series?expand") or []:
        modality = series["MainDicomTags"].get("Modality")
        study = orthanc.get(f"/studies/{series['ParentStudy']}")
        if study["MainDicomTags"]["StudyInstanceUID"] != study_uid or modality == "CT":
            continue
        data = http_bytes(f"{orthanc.url}/instances/{series['Instances'][0]}/file")
        found[modality] = pydicom.dcmread(io.BytesIO(data))
    return found


def _events(node: NodeProcess, job_id: int) -> dict[str, str]:
    return {e["kind"]: e["detail"] for e in node.get("/api/events") or [] if e["job_id"] == job_id}


def _sr_text(sr: pydicom.Dataset) -> str:
    """Every code meaning and text value of the SR's content tree, one per line."""
    lines: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            for key in ("ConceptCodeSequence", "ConceptNameCodeSequence"):
                if key in item:
                    lines.append(str(item[key][0].CodeMeaning))
            if "TextValue" in item:
                lines.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return "\n".join(lines)


@pytest.mark.integration
def test_a_clean_ct_comes_back_named_by_the_site_template(
    node: NodeProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    """The template end to end: Orthanc's copies carry its names, colours, types and label."""
    files = write_variant("clean", tmp_path, "QC report")
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    assert storescu(node.dimse_port, files).returncode == 0
    job = _job(node, study, ("done", "failed", "rejected"))
    assert job["state"] == "done", job
    objects = wait_for(
        lambda: (o := _in_orthanc(orthanc, study)) and len(o) == 3 and o, 60, "3 objects"
    )
    rt, seg = objects["RTSTRUCT"], objects["SEG"]
    assert rt.StructureSetLabel == "AI_TG263"
    rois = {r.ROINumber: r.ROIName for r in rt.StructureSetROISequence}
    assert list(rois.values()) == ["External"]
    colors = {c.ReferencedROINumber: list(c.ROIDisplayColor) for c in rt.ROIContourSequence}
    assert colors[1] == [0, 255, 0]
    (obs,) = rt.RTROIObservationsSequence
    assert obs.RTROIInterpretedType == "EXTERNAL" and obs.ROIObservationLabel == "External"
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["External"]
    events = _events(node, job["id"])
    assert "template_applied" in events
    # the head CT says BRAIN: the lungs were out of ct-lungs' view (the SR says not assessable)
    assert "ct-lungs:Right Lung: out of view: Body Part Examined BRAIN" in events["not_assessable"]


@pytest.mark.integration
def test_a_ct_with_a_missing_slice_is_rejected_with_a_report(
    node: NodeProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    files = write_variant("missing", tmp_path, "QC report")
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    assert storescu(node.dimse_port, files).returncode == 0
    job = _job(node, study, ("done", "failed", "rejected"))
    assert job["state"] == "done" and "missing_slices" in (job["error"] or ""), job
    events = _events(node, job["id"])
    assert "1 missing" in events["qc_failed"]
    objects = wait_for(lambda: _in_orthanc(orthanc, study) or None, 60, "the report")
    assert set(objects) == {"SR"}  # no SEG, no RTSTRUCT: no model ran
    text = _sr_text(objects["SR"])
    assert codes.DCM.RejectedForQualityReasons.meaning in text and "missing_slices" in text
    assert text.count("Presence Undetermined") == 3  # External, Lung_R, Lung_L


@pytest.mark.integration
def test_a_truncated_field_of_view_is_rejected_and_nothing_is_sent(
    node: NodeProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    files = write_variant("truncated", tmp_path, "QC reject")
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    assert storescu(node.dimse_port, files).returncode == 0
    job = _job(node, study, ("done", "failed", "rejected"))
    assert job["state"] == "rejected", job
    match = re.search(
        r"truncated_fov: the field of view cuts the patient on (\d+) of 30", job["error"]
    )
    assert match and int(match.group(1)) > 0, job["error"]
    time.sleep(2)
    assert _in_orthanc(orthanc, study) == {}


@pytest.mark.integration
def test_irregular_spacing_warns_and_the_sr_says_so(
    node: NodeProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    files = write_variant("irregular", tmp_path, "QC warn")
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    assert storescu(node.dimse_port, files).returncode == 0
    job = _job(node, study, ("done", "failed", "rejected"))
    assert job["state"] == "done" and not job["error"], job
    assert "slice_spacing: a departure of 0.50 mm" in _events(node, job["id"])["qc_warning"]
    objects = wait_for(
        lambda: (o := _in_orthanc(orthanc, study)) and len(o) == 3 and o, 60, "3 objects"
    )
    text = _sr_text(objects["SR"])
    assert codes.DCM.UsableDoesNotMeetTheQualityControlStandard.meaning in text, text
    assert "slice_spacing" in text
    # the lungs were not found on a series whose quality is in doubt: not assessable
    assert text.count("Presence Undetermined") == 2
