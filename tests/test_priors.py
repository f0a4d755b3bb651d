"""Priors and change over time, end to end: the node (its own Triton, the shipped body model)
and Orthanc as the PACS, on the shared head CT.

Each patient has two studies months apart: the head CT as it is (the prior, March), and a
modified copy (new UIDs, August) whose top 20 slices are air: the body loses exactly what the
prior's body held on those slices.

- Patient A: both studies go to the node. The later study's SR compares with the earlier
  one: the prior's volume equals the earlier job's own SR, and the change equals the prior
  SEG's body on the blanked slices (read back with highdicom), both within 1 %.
- Patient B: the prior is only in Orthanc. The node finds it by C-FIND (Patient ID), fetches
  it by C-GET, runs the same model on it and reports the same numbers.
- A patient with no earlier study: the job says so (``prior_no_prior``), its SR has no
  comparison.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from tests.peers import (
    NodeProcess,
    Orthanc,
    head_ct_files,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    wait_for,
)
from tests.test_end_to_end import dciodvfy
from tests.test_planning import _pixelmed_validates

pytestmark = pytest.mark.integration
BLANKED = 20  # top slices made air in the later study
PRIOR_DATE, LATER_DATE, DAYS = "20260302", "20260814", 165


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Orthanc]]:
    tmp = tmp_path_factory.mktemp("priors")
    # the PACS knows the node (a site registers it), so it answers its C-FIND and C-GET
    orthanc = start_orthanc(
        tmp / "orthanc", extra={"DicomModalities": {"airouter": ["AIROUTER", "127.0.0.1", 104]}}
    )
    rules = tmp / "rules"
    rules.mkdir()
    rule = {
        "name": "followed",
        "when": {"called_ae": "PRIORS"},
        "match": {"Modality": "CT"},
        "select": {"orientation": "axial", "exclude_image_types": ["LOCALIZER"]},
        "models": ["ct-body"],
        "outputs": ["SEG", "SR"],
        "compare_with_prior": {"source": "pacs"},
    }
    (rules / "priors.yaml").write_text(yaml.safe_dump({"rules": [rule]}))
    node = start_node(
        tmp / "node", orthanc, router={"rules_dir": str(rules), "quiet_period_s": 1.0}
    )
    yield node, orthanc
    stop_process(node.process)
    stop_process(orthanc.process)
    assert "Traceback" not in node.log_text()


def _copy(out: Path, patient: str, study_date: str, blank: int = 0) -> tuple[str, list[Path]]:
    """The head CT as a new study of ``patient`` on ``study_date``; the top ``blank`` slices
    (highest z) all air."""
    out.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = head_ct_files()
    datasets = [pydicom.dcmread(f) for f in files]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    written = []
    for k, ds in enumerate(datasets):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = patient, f"{patient}^Test"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.AccessionNumber = patient[-8:]
        if k >= len(datasets) - blank:
            pixels = ds.pixel_array
            air = (-1000 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
            info = np.iinfo(pixels.dtype)
            pixels = np.full_like(pixels, int(np.clip(air, info.min, info.max)))
            ds.PixelData = pixels.tobytes()
        path = out / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return study, written


def _done(node: NodeProcess, study: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        jobs = [j for j in node.get(f"/api/jobs?study={study}") or [] if j["state"] == "done"]
        return jobs[-1] if jobs else None

    return wait_for(find, 400, "the job done")  # type: ignore[no-any-return]


def _archived(node: NodeProcess, job: dict[str, Any], kind: str) -> pydicom.Dataset:
    [out] = [o for o in job["outputs"] if o["kind"] == kind]
    [path] = (node.data_dir / "archive").rglob(f"{out['sop_instance_uid']}.dcm")
    return pydicom.dcmread(path)


def _numbers(sr: pydicom.Dataset) -> list[dict[str, Any]]:
    """Every measurement group of the SR: its tracking UID, time point and NUMs by code."""
    groups = []

    def walk(node: pydicom.Dataset) -> None:
        for item in node.get("ContentSequence", []):
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if item.ValueType == "CONTAINER" and name is not None and name.CodeValue == "125007":
                group: dict[str, Any] = {"nums": {}, "time_point": None, "uid": None}
                for x in item.ContentSequence:
                    code = x.ConceptNameCodeSequence[0].CodeValue
                    if x.ValueType == "UIDREF" and code == "112040":
                        group["uid"] = x.UID
                    elif x.ValueType == "TEXT" and code == "C2348792":  # Time Point
                        group["time_point"] = x.TextValue
                    elif x.ValueType == "NUM" and "MeasuredValueSequence" in x:
                        value = x.MeasuredValueSequence[0]
                        unit = value.MeasurementUnitsCodeSequence[0].CodeValue
                        group["nums"][code] = (float(value.NumericValue), unit)
                groups.append(group)
            elif item.ValueType == "CONTAINER":
                walk(item)

    walk(sr)
    return groups


def _body_ml(seg: pydicom.Dataset, ct: list[pydicom.Dataset], only_top: int = 0) -> float:
    """The SEG's body (read back with highdicom) on the CT grid, in ml; ``only_top``: on that
    many top slices only."""
    segmentation = hd.seg.Segmentation.from_dataset(seg)
    uids = [ds.SOPInstanceUID for ds in ct]
    mask = segmentation.get_pixels_by_source_instance(uids, segment_numbers=[1])[..., 0] > 0
    if only_top:
        mask = mask[-only_top:]
    spacing = [float(v) for v in ct[0].PixelSpacing]
    step = abs(float(ct[1].ImagePositionPatient[2]) - float(ct[0].ImagePositionPatient[2]))
    return int(mask.sum()) * spacing[0] * spacing[1] * step / 1000.0


def _comparison(sr: pydicom.Dataset) -> tuple[dict[str, Any], dict[str, Any]]:
    groups = _numbers(sr)
    [current] = [g for g in groups if g["time_point"] is None and "118565006" in g["nums"]]
    [prior] = [g for g in groups if g["time_point"] is not None]
    assert prior["uid"] == current["uid"]  # one structure, tracked across the studies
    return current, prior


def test_the_later_study_reports_the_change_since_the_prior(
    peers: tuple[NodeProcess, Orthanc], tmp_path: Path
) -> None:
    node, orthanc = peers
    # patient A: both studies through the node
    prior_a, prior_files = _copy(tmp_path / "a1", "PRIOR-A", PRIOR_DATE)
    assert storescu(node.dimse_port, prior_files, "PRIORS").returncode == 0
    first = _done(node, prior_a)
    events = node.get(f"/api/events?study={prior_a}")
    assert any(e["kind"] == "prior_no_prior" for e in events)  # nothing earlier: said so
    assert not [g for g in _numbers(_archived(node, first, "SR")) if g["time_point"]]
    later_a, later_files = _copy(tmp_path / "a2", "PRIOR-A", LATER_DATE, blank=BLANKED)
    assert storescu(node.dimse_port, later_files, "PRIORS").returncode == 0
    second = _done(node, later_a)

    ct = [pydicom.dcmread(f, stop_before_pixels=True) for f in prior_files]
    seg = _archived(node, first, "SEG")
    prior_ml = _body_ml(seg, ct)
    lost_ml = _body_ml(seg, ct, only_top=BLANKED)
    assert lost_ml > 10  # the blanked slices held a real part of the head
    first_sr = _archived(node, first, "SR")
    [own] = [g for g in _numbers(first_sr) if "118565006" in g["nums"]]
    assert own["nums"]["118565006"][0] == pytest.approx(prior_ml, rel=1e-3)

    sr = _archived(node, second, "SR")
    current, prior = _comparison(sr)
    assert prior["time_point"] == f"prior study of {PRIOR_DATE}"
    assert prior["nums"]["118565006"] == (pytest.approx(prior_ml, rel=0.01), "ml")
    change, unit = prior["nums"]["VOLCHG"]
    assert unit == "ml" and change == pytest.approx(-lost_ml, rel=0.01)
    assert current["nums"]["118565006"][0] == pytest.approx(prior_ml - lost_ml, rel=0.01)
    assert prior["nums"]["125314"] == (pytest.approx(-100 * lost_ml / prior_ml, rel=0.01), "%")
    assert prior["nums"]["385673002"] == (DAYS, "d")
    print(  # the acceptance's figures (pytest -s)
        f"\npriors A: prior {prior['nums']['118565006'][0]:.2f} ml (its own SEG {prior_ml:.2f}),"
        f" change {change:.2f} ml (blanked {-lost_ml:.2f}),"
        f" {prior['nums']['125314'][0]:.2f} % over {DAYS} d"
    )
    # the comparison is valid DICOM and TID 1500 to dciodvfy and PixelMed, dcmqi reads it
    path = tmp_path / "compared-sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == [], errors
    _pixelmed_validates("prior comparison", path)
    reader = subprocess.run(
        [str(Path(sys.executable).parent / "tid1500reader"), "--inputDICOM", str(path),
         "--outputMetadata", str(tmp_path / "sr.json")],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert reader.returncode == 0, reader.stdout + reader.stderr
    [evidence] = sr.PertinentOtherEvidenceSequence
    assert evidence.StudyInstanceUID == prior_a
    referenced = {
        r.ReferencedSOPInstanceUID
        for r in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in ct}
    compared = [
        e for e in node.get(f"/api/events?study={later_a}") if e["kind"] == "prior_compared"
    ]
    assert compared and '"where": "archive"' in compared[0]["detail"]

    # patient B: the prior only in the PACS
    prior_b, prior_b_files = _copy(tmp_path / "b1", "PRIOR-B", PRIOR_DATE)
    assert storescu(orthanc.dicom_port, prior_b_files, orthanc.aet).returncode == 0
    later_b, later_b_files = _copy(tmp_path / "b2", "PRIOR-B", LATER_DATE, blank=BLANKED)
    assert storescu(node.dimse_port, later_b_files, "PRIORS").returncode == 0
    third = _done(node, later_b)
    compared = [
        e for e in node.get(f"/api/events?study={later_b}") if e["kind"] == "prior_compared"
    ]
    assert compared and '"where": "pacs"' in compared[0]["detail"]
    assert prior_b in compared[0]["detail"]
    current_b, prior_b_group = _comparison(_archived(node, third, "SR"))
    assert prior_b_group["nums"]["118565006"][0] == pytest.approx(prior_ml, rel=0.01)
    assert prior_b_group["nums"]["VOLCHG"][0] == pytest.approx(-lost_ml, rel=0.01)
    assert current_b["nums"]["118565006"][0] == pytest.approx(prior_ml - lost_ml, rel=0.01)
    print(
        f"priors B (from Orthanc): prior {prior_b_group['nums']['118565006'][0]:.2f} ml,"
        f" change {prior_b_group['nums']['VOLCHG'][0]:.2f} ml"
    )
    sr_b = _archived(node, third, "SR")
    assert sr_b.PertinentOtherEvidenceSequence[0].StudyInstanceUID == prior_b
