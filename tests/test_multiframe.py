"""Enhanced (multi-frame) source images: the shared head CT converted to a Legacy Converted
Enhanced CT Image (highdicom), sent as one instance, processed, and referenced frame by frame
by the SEG, SR and RTSTRUCT."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml

from airouter.jobs.artefacts import load_masks
from inference.volume import build_volume
from tests.peers import head_ct_files, start_node, stop_process, storescu, tool, wait_for

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def enhanced_ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    files = head_ct_files()[40:100]
    images = [pydicom.dcmread(f) for f in files]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        images,
        series_instance_uid=hd.UID(),
        series_number=77,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    # frames in an order that is not the slice order, to prove frames are mapped, not assumed
    order = list(range(0, 60, 2)) + list(range(1, 60, 2))
    frame_bytes = int(enhanced.Rows) * int(enhanced.Columns) * 2
    data = enhanced.PixelData
    enhanced.PixelData = b"".join(data[n * frame_bytes : (n + 1) * frame_bytes] for n in order)
    groups = list(enhanced.PerFrameFunctionalGroupsSequence)
    enhanced.PerFrameFunctionalGroupsSequence = [groups[n] for n in order]
    path = tmp_path_factory.mktemp("enhanced") / "enhanced-ct.dcm"
    enhanced.save_as(path)
    return path, files


def test_volume_of_an_enhanced_ct_equals_that_of_its_single_frame_images(
    enhanced_ct: tuple[Path, list[Path]],
) -> None:
    path, files = enhanced_ct
    multi, single = build_volume([path]), build_volume(files)
    assert np.array_equal(multi.hu, single.hu)
    assert np.allclose(multi.affine, single.affine, atol=1e-4)
    assert multi.frame_numbers is not None and sorted(multi.frame_numbers) == list(range(1, 61))
    assert multi.frame_numbers[:3] == [1, 31, 2]  # slice order, not frame order
    assert [int(d.ReferencedFrameNumber) for d in multi.datasets] == multi.frame_numbers


def _errors(path: Path) -> list[str]:
    out = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, check=False)
    text = (out.stdout + out.stderr).decode("utf-8", errors="replace")
    return [ln for ln in text.splitlines() if ln.startswith("Error")]


@pytest.mark.integration
def test_enhanced_ct_through_the_node_to_seg_sr_rtstruct(
    enhanced_ct: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    path, _ = enhanced_ct
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {
                        "name": "enhanced",
                        "match": {"Modality": "CT"},
                        "select": {"orientation": "axial", "min_instances": 5},  # 60 frames
                        "models": ["ct-body"],
                    }
                ]
            }
        )
    )
    node = start_node(
        tmp_path / "node", None, router={"rules_dir": str(rules), "quiet_period_s": 0.5}
    )
    try:
        # -R: propose the files' own SOP class (storescu's default list lacks this one)
        assert storescu(node.dimse_port, [path], "AIROUTER", "-R").returncode == 0
        enhanced = pydicom.dcmread(path)

        def finished() -> dict[str, Any] | None:
            for job in node.get("/api/jobs") or []:
                if job["state"] in ("done", "failed"):
                    return dict(job)
            return None

        job = wait_for(finished, 120, "the job")
        assert job["state"] == "done", job["error"]
        objects = {}
        for output in job["outputs"]:
            (found,) = (node.data_dir / "archive").rglob(f"{output['sop_instance_uid']}.dcm")
            objects[output["kind"]] = found
        assert set(objects) == {"SEG", "SR", "RTSTRUCT"}
        for kind, file in objects.items():
            assert _errors(file) == [], kind

        volume = build_volume([path])
        body = load_masks(node.data_dir / "jobs" / str(job["id"]) / "masks.npz")["ct-body/Body"]
        seg = hd.seg.segread(objects["SEG"])
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=enhanced.SOPInstanceUID,
            source_frame_numbers=list(range(1, 61)),
            segment_numbers=[1],
            assert_missing_frames_are_empty=True,
        )[..., 0].astype(bool)
        assert pixels.any() and np.array_equal(pixels, volume.in_source_order(body))

        rt = pydicom.dcmread(objects["RTSTRUCT"])
        frames = {int(d.ReferencedFrameNumber): d for d in volume.datasets}
        contours = rt.ROIContourSequence[0].ContourSequence
        assert len(contours) >= 55
        for contour in contours:
            (ref,) = contour.ContourImageSequence
            assert ref.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
            view = frames[int(ref.ReferencedFrameNumber)]
            iop = np.asarray(view.ImageOrientationPatient, float)
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            offset = points - np.asarray(view.ImagePositionPatient, float)
            assert np.abs(offset @ np.cross(iop[:3], iop[3:])).max() < 0.1  # on its frame
        listed = (
            rt.ReferencedFrameOfReferenceSequence[0]
            .RTReferencedStudySequence[0]
            .RTReferencedSeriesSequence[0]
            .ContourImageSequence
        )
        assert sorted(int(r.ReferencedFrameNumber) for r in listed) == list(range(1, 61))
        report = hd.sr.srread(objects["SR"])
        (group,) = report.content.get_volumetric_roi_measurement_groups()
        assert group.referenced_segment is not None
    finally:
        stop_process(node.process)
