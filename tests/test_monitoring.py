"""Monitoring end to end: the node (its own Triton, the shipped body and lung models) contours
two synthetic chest CTs; a "planning system" sends back each RTSTRUCT with structures moved by
a known number of pixels, and the node compares them with its own.

- Study A (patient sex M): only the left lung moved, 3 pixels along the rows (to -x). The other
  structures agree exactly (Dice 1, HD95 0, surface Dice 1, no volume difference); the left
  lung's Dice and volume difference equal those of the test's own rasterization of our
  RTSTRUCT (``tests/raster.py``) and its shifted copy; its HD95 is at most the shift.
- Study B (patient sex F): every structure moved 10 pixels. The subgroup sex=F of the lung
  model is flagged (the API, an audit event, the metric); sex=M is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from tests.peers import NodeProcess, http_bytes, start_node, stop_process, storescu, wait_for
from tests.phantoms import chest_phantom, write_ct_series
from tests.raster import dice, rasterize_rtstruct, sorted_ct

pytestmark = pytest.mark.integration
SHIFT_A, SHIFT_B = -3, -10  # pixels along the rows: towards the patient's right (-x)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("monitoring")
    rules = tmp / "rules"
    rules.mkdir()
    rule = {
        "name": "contoured",
        "when": {"called_ae": "MONITOR"},
        "match": {"Modality": "CT"},
        "select": {"orientation": "axial", "min_instances": 5},
        "models": ["ct-body", "ct-lungs"],
        "outputs": ["RTSTRUCT"],
    }
    (rules / "monitor.yaml").write_text(yaml.safe_dump({"rules": [rule]}))
    process = start_node(
        tmp / "node",
        None,
        router={"rules_dir": str(rules), "quiet_period_s": 0.5},
        monitoring={"min_cases": 1, "dice_threshold": 0.8, "margin": 0.1},
    )
    yield process
    stop_process(process.process)
    assert "Traceback" not in process.log_text()


def _send_ct(node: NodeProcess, out: Path, sex: str) -> tuple[str, list[Path]]:
    p = chest_phantom(slices=24, size=96)
    study, files = write_ct_series(p.hu, p.affine, out, patient_id=f"MON-{sex}")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientSex = sex
        ds.save_as(f)
    result = storescu(node.dimse_port, files, "MONITOR")
    assert result.returncode == 0, result.stderr
    return study, files


def _jobs(node: NodeProcess, study: str, rule: str, state: str = "done") -> list[dict[str, Any]]:
    return [
        j
        for j in node.get(f"/api/jobs?study={study}") or []
        if j["rule"] == rule and j["state"] == state
    ]


def _our_rtstruct(node: NodeProcess, study: str) -> pydicom.Dataset:
    [job] = wait_for(lambda: _jobs(node, study, "contoured"), 240, "the contouring job")
    [out] = [o for o in job["outputs"] if o["kind"] == "RTSTRUCT"]
    [path] = (node.data_dir / "archive").rglob(f"{out['sop_instance_uid']}.dcm")
    return pydicom.dcmread(path)


def _moved(rt: pydicom.Dataset, ct: list[pydicom.Dataset], names: set[str], pixels: int) -> Any:
    """A copy of ``rt`` as a planning system would send it back: new UIDs, the named ROIs'
    contours moved ``pixels`` along the image rows."""
    moved = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(rt)))
    moved.SOPInstanceUID = moved.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    moved.SeriesInstanceUID = generate_uid()
    moved.SeriesDescription = moved.StructureSetLabel = "Approved"
    moved.Manufacturer = "Planning system"
    step = np.asarray(ct[0].ImageOrientationPatient[:3], float) * float(ct[0].PixelSpacing[1])
    numbers = {r.ROINumber for r in moved.StructureSetROISequence if r.ROIName in names}
    assert len(numbers) == len(names)
    for roi in moved.ROIContourSequence:
        if roi.ReferencedROINumber not in numbers:
            continue
        for contour in roi.ContourSequence:
            points = np.asarray(contour.ContourData, float).reshape(-1, 3) + pixels * step
            contour.ContourData = [f"{v:.6f}" for v in points.ravel()]
    return moved


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = pydicom.filebase.DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _return(node: NodeProcess, ds: pydicom.Dataset, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "rtstruct.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = storescu(node.dimse_port, [path], "AIROUTER")
    assert result.returncode == 0, result.stderr


def test_returned_structure_sets_are_measured_and_a_worse_subgroup_flagged(
    node: NodeProcess, tmp_path: Path
) -> None:
    study_a, files_a = _send_ct(node, tmp_path / "a", "M")
    study_b, _ = _send_ct(node, tmp_path / "b", "F")
    rt_a, rt_b = _our_rtstruct(node, study_a), _our_rtstruct(node, study_b)
    ct = sorted_ct(files_a)
    all_names = {r.ROIName for r in rt_a.StructureSetROISequence}
    assert all_names == {"Body", "Right Lung", "Left Lung"}
    _return(node, _moved(rt_a, ct, {"Left Lung"}, SHIFT_A), tmp_path / "back-a")
    _return(node, _moved(rt_b, ct, all_names, SHIFT_B), tmp_path / "back-b")
    for study in (study_a, study_b):
        wait_for(lambda s=study: _jobs(node, s, "monitoring"), 120, "the evaluation job")

    report = node.get("/api/monitoring")
    rows = {(e["study_uid"], e["structure"]): e for e in report["evaluations"]}
    assert len(rows) == 6
    for name in ("Body", "Right Lung"):
        same = rows[(study_a, name)]
        assert same["dice"] == pytest.approx(1.0, abs=1e-9)
        assert same["hd95_mm"] == pytest.approx(0.0, abs=1e-9)
        assert same["surface_dice"] == pytest.approx(1.0, abs=1e-9)
        assert same["volume_difference_ml"] == pytest.approx(0.0, abs=1e-9)

    # the edited structure: what the test's own rasterization says
    ours = rasterize_rtstruct(rt_a, ct)["Left Lung"]
    n = -SHIFT_A
    assert ours.any() and not ours[..., :n].any()  # nothing moves off the image
    theirs = np.zeros_like(ours)
    theirs[..., :-n] = ours[..., n:]
    pixel = [float(v) for v in ct[0].PixelSpacing]
    thickness = abs(float(ct[1].ImagePositionPatient[2]) - float(ct[0].ImagePositionPatient[2]))
    voxel_ml = pixel[0] * pixel[1] * thickness / 1000.0
    left = rows[(study_a, "Left Lung")]
    assert left["dice"] == pytest.approx(dice(ours, theirs), abs=1e-6)  # MONAI: float32
    assert left["dice"] < 0.95
    expected_ml = (int(ours.sum()) - int(theirs.sum())) * voxel_ml
    assert left["volume_difference_ml"] == pytest.approx(expected_ml, abs=1e-6)
    print(  # the acceptance's figures (pytest -s)
        f"\nmonitoring: Dice {left['dice']:.4f} (expected {dice(ours, theirs):.4f}),"
        f" volume difference {left['volume_difference_ml']:.2f} ml (expected {expected_ml:.2f}),"
        f" HD95 {left['hd95_mm']:.2f} mm, surface Dice {left['surface_dice']:.4f}"
    )
    assert left["volume_ml"] == pytest.approx(int(ours.sum()) * voxel_ml, rel=1e-9)
    assert 0 < left["hd95_mm"] <= n * pixel[1] + 1e-6
    assert 0 <= left["surface_dice"] < 1  # moved 6 mm, more than the 2 mm tolerance
    assert left["model"] == "ct-lungs" and left["subgroup"]["sex"] == "M"
    assert rows[(study_b, "Body")]["model"] == "ct-body"

    # the subgroup made worse on purpose is flagged, the other is not
    flagged = {(x["model"], x["dimension"], x["value"]) for x in report["flagged"]}
    assert ("ct-lungs", "sex", "F") in flagged
    assert not any(d == "sex" and v == "M" for _, d, v in flagged)
    events = node.get("/api/events?kind=subgroup_flagged")
    assert any("ct-lungs/" in e["detail"] and "sex=F" in e["detail"] for e in events)
    metrics = http_bytes(node.url + "/metrics").decode()
    line = next(
        ln
        for ln in metrics.splitlines()
        if ln.startswith("airouter_model_subgroup_flagged{")
        and 'model="ct-lungs"' in ln
        and 'dimension="sex"' in ln
        and 'value="F"' in ln
    )
    assert line.endswith(" 1.0")
    page = http_bytes(node.url + "/dashboard/models").decode()
    assert page.count('class="flagged"') == len(report["flagged"]) > 0
