"""The walking skeleton against real peers: DCMTK storescu -> node (+ tritonserver) -> Orthanc.

Acceptance of the skeleton: a 140-slice CT comes back as SEG + SR + RTSTRUCT in Orthanc, each
valid per dciodvfy and referencing the CT; the SEG is the model's mask exactly; RTSTRUCT
contours give Dice >= 0.98; SR volumes match the SEG. JPEG 2000 CT with blank UIDs and an MR
series go through without a crash.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from airouter.jobs.artefacts import load_masks
from tests.peers import (
    BODY_J2K,
    MR_EPI,
    SHARED_DICOM,
    NodeProcess,
    Orthanc,
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
from tests.raster import dice, rasterize_rtstruct, sorted_ct

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield pacs
    stop_process(pacs.process)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Iterator[NodeProcess]:
    n = start_node(tmp_path_factory.mktemp("node"), orthanc)
    yield n
    stop_process(n.process)


def orthanc_objects(orthanc: Orthanc, study_uid: str) -> dict[str, pydicom.Dataset]:
    """The study's SEG / SR / RTSTRUCT objects in Orthanc, by modality."""
    found: dict[str, pydicom.Dataset] = {}
    for series in orthanc.get("/series?expand") or []:
        modality = series["MainDicomTags"].get("Modality")
        if modality not in ("SEG", "SR", "RTSTRUCT"):
            continue
        study = orthanc.get(f"/studies/{series['ParentStudy']}")
        if study["MainDicomTags"]["StudyInstanceUID"] != study_uid:
            continue
        data = http_bytes(f"{orthanc.url}/instances/{series['Instances'][0]}/file")
        found[modality] = pydicom.dcmread(io.BytesIO(data))
    return found


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    result = subprocess.run(
        [tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [
        ln for ln in lines if ln.startswith("Warning")
    ]


def job_for(node: NodeProcess, study_uid: str) -> dict:
    jobs = node.get(f"/api/jobs?study={study_uid}") or []
    return jobs[0] if jobs else {}


def test_ct_study_comes_back_as_seg_sr_rtstruct_in_orthanc(
    node: NodeProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    files = head_ct_files()
    assert len(files) == 140
    ct = sorted_ct(files)
    study_uid, series_uid = ct[0].StudyInstanceUID, ct[0].SeriesInstanceUID

    sent = storescu(node.dimse_port, files)
    last_response = time.monotonic()
    assert sent.returncode == 0, sent.stderr

    objects = wait_for(
        lambda: (o := orthanc_objects(orthanc, study_uid)) and len(o) == 3 and o,
        180,
        "SEG, SR and RTSTRUCT in Orthanc",
        every_s=0.25,
    )
    latency_s = time.monotonic() - last_response
    job = wait_for(
        lambda: (j := job_for(node, study_uid)) and j["state"] == "done" and j,
        30,
        "the job to be done",
    )
    print(
        f"\nlast C-STORE response -> 3 objects in Orthanc: {latency_s:.2f} s; "
        f"job timings: {job['timings']}"
    )

    ct_sops = [ds.SOPInstanceUID for ds in ct]
    seg, sr, rt = objects["SEG"], objects["SR"], objects["RTSTRUCT"]

    # 1. same study, references to the CT series' UIDs
    for ds in objects.values():
        assert ds.StudyInstanceUID == study_uid
        assert ds.PatientID == ct[0].PatientID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    seg_sources = {
        ref.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for ref in derivation.SourceImageSequence
    }
    assert seg_sources <= set(ct_sops)
    evidence = {
        (series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert {(series_uid, sop) for sop in ct_sops} <= evidence
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) in evidence
    rt_series = (
        rt.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
    )
    assert rt.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == ct[0].FrameOfReferenceUID
    assert rt_series.SeriesInstanceUID == series_uid
    assert [i.ReferencedSOPInstanceUID for i in rt_series.ContourImageSequence] == ct_sops
    observed = {o.ReferencedROINumber: o.RTROIInterpretedType for o in rt.RTROIObservationsSequence}
    names = {r.ROINumber: r.ROIName for r in rt.StructureSetROISequence}
    assert {names[n]: t for n, t in observed.items()}["Body"] == "EXTERNAL"

    # 2. dciodvfy: no errors (warnings listed); dsrdump parses the SR
    for modality, ds in objects.items():
        path = tmp_path / f"{modality}.dcm"
        ds.save_as(path)
        errors, warnings = dciodvfy(path)
        print(f"dciodvfy {modality}: {len(errors)} errors, {len(warnings)} warnings")
        for w in warnings:
            print("   ", w)
        assert errors == [], f"{modality}: {errors}"
    dump = subprocess.run(
        [tool("dsrdump"), "+Pl", str(tmp_path / "SR.dcm")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout and "Volume" in dump.stdout
    # a head CT (Body Part Examined BRAIN): the lungs are out of ct-lungs' view, not absent
    assert dump.stdout.count("Absent") == 0
    assert dump.stdout.count("Presence Undetermined") == 2
    assert dump.stdout.count("Not assessable: out of view: Body Part Examined BRAIN") == 2

    # 3. SEG == the model's mask exactly; RTSTRUCT Dice >= 0.98; SR volumes == SEG within 1 %
    masks = load_masks(node.data_dir / "jobs" / str(job["id"]) / "masks.npz")
    seg_read = hd.seg.segread(tmp_path / "SEG.dcm")
    labels = {d.SegmentNumber: d.SegmentLabel for d in seg_read.SegmentSequence}
    assert "Body" in labels.values()
    pixels = seg_read.get_pixels_by_source_instance(
        source_sop_instance_uids=ct_sops,
        segment_numbers=sorted(labels),
        assert_missing_frames_are_empty=True,
    )
    model = {key.split("/")[1]: mask for key, mask in masks.items()}
    for index, number in enumerate(sorted(labels)):
        assert np.array_equal(pixels[..., index].astype(bool), model[labels[number]]), labels[
            number
        ]
    for name in model:  # structures the model left empty are absent, not empty segments
        assert (name in labels.values()) == bool(model[name].any())

    contours = rasterize_rtstruct(rt, ct)
    for name, mask in contours.items():
        score = dice(mask, model[name])
        print(f"RTSTRUCT {name}: Dice {score:.4f}")
        assert score >= 0.98, name

    spacing = np.linalg.norm(np.subtract(ct[1].ImagePositionPatient, ct[0].ImagePositionPatient))
    voxel_ml = float(ct[0].PixelSpacing[0]) * float(ct[0].PixelSpacing[1]) * spacing / 1000
    report = hd.sr.srread(tmp_path / "SR.dcm")
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(labels)
    for group in groups:
        ref = group.referenced_segment
        assert ref is not None and ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        (number,) = ref.referenced_segment_numbers
        volume = group.get_measurements(name=codes.SCT.Volume)[0].value
        seg_volume = pixels[..., sorted(labels).index(number)].sum() * voxel_ml
        assert volume == pytest.approx(seg_volume, rel=0.01)


def test_head_ct_folder_with_non_image_dirfile_is_refused_clearly(node: NodeProcess) -> None:
    dirfile = head_ct_files()[0].parent / "DIRFILE"
    sent = storescu(node.dimse_port, [dirfile], "AIROUTER", "-v")
    assert sent.returncode != 0
    assert "Received Store Response (Error: CannotUnderstand)" in sent.stdout + sent.stderr
    events = node.get("/api/events?kind=store_refused") or []
    assert any("StudyInstanceUID is missing or empty" in e["detail"] for e in events)


def _airouter_send(node: NodeProcess, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "airouter.app.cli",
            "send",
            str(folder),
            "--port",
            str(node.dimse_port),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_jpeg2000_ct_with_blank_uids_is_refused_with_a_reason(node: NodeProcess) -> None:
    """storescu cannot even send these (the data set's SOP Class UID is empty); our SCU sends
    them as stored, and the node refuses each with 0xC210 naming the missing UID."""
    before = len(node.get("/api/jobs") or [])
    result = _airouter_send(node, BODY_J2K)
    assert result.returncode == 3
    assert result.stderr.count("0xC210 StudyInstanceUID is missing or empty") == 20
    assert len(node.get("/api/jobs") or []) == before
    assert node.process.poll() is None


def test_jpeg2000_ct_is_decoded_once_its_uids_are_repaired(
    node: NodeProcess, tmp_path: Path
) -> None:
    """The same compressed CT, with study/series UIDs filled in, runs through the whole path:
    the JPEG 2000 pixel data is decoded centrally for the models."""
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in BODY_J2K.iterdir():
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.save_as(tmp_path / path.name)
    result = _airouter_send(node, tmp_path)
    assert result.returncode == 0, result.stderr
    job = wait_for(
        lambda: (j := job_for(node, study_uid)) and j["state"] in ("done", "failed") and j,
        120,
        "the J2K job to finish",
    )
    assert job["state"] == "done", job["error"]
    assert {o["kind"] for o in job["outputs"]} == {"SEG", "SR", "RTSTRUCT"}


def test_mr_series_matches_no_ct_rule(node: NodeProcess) -> None:
    files = sorted(MR_EPI.glob("*.dcm"))
    assert files
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    sent = storescu(node.dimse_port, files)
    assert sent.returncode == 0, sent.stderr
    wait_for(
        lambda: node.get(f"/api/events?study={study_uid}&kind=no_rule_matched"),
        60,
        "the MR study to complete unmatched",
    )
    assert node.get(f"/api/jobs?study={study_uid}") == []
    series = node.get(f"/dicomweb/studies/{study_uid}/series")
    assert series and series[0]["00080060"]["Value"] == ["MR"]
    assert series[0]["00201209"]["Value"] == [len(files)]


def test_completion_within_3_s_of_release_and_amended_results(
    node: NodeProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    """Default completion settings: a single-series CT study is routed less than 3 s after the
    association is released; one more instance later gives version 2 of the results."""
    files = fresh_copy(head_ct_files()[50:80], tmp_path / "ct")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    sent = storescu(node.dimse_port, files)
    released = time.monotonic()
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: node.get(f"/api/jobs?study={study_uid}"), 10, "a job", every_s=0.05)
    assert time.monotonic() - released < 3.0
    first = wait_for(
        lambda: (j := job_for(node, study_uid)) and j["state"] == "done" and j, 120, "job v1"
    )
    assert (first["version"], first["instance_count"]) == (1, 30)

    late = pydicom.dcmread(head_ct_files()[80])  # the next slice, arriving after routing
    late.StudyInstanceUID = study_uid
    late.SeriesInstanceUID = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    late.SOPInstanceUID = generate_uid()
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late.save_as(tmp_path / "late.dcm")
    assert storescu(node.dimse_port, [tmp_path / "late.dcm"]).returncode == 0

    def second_done() -> dict | None:
        jobs = node.get(f"/api/jobs?study={study_uid}") or []
        done = [j for j in jobs if j["version"] == 2 and j["state"] == "done"]
        return done[0] if done else None

    second = wait_for(second_done, 120, "job v2")
    assert second["instance_count"] == 31
    assert len(node.get(f"/api/jobs?study={study_uid}")) == 2
    descriptions = wait_for(
        lambda: (
            {
                s["MainDicomTags"].get("SeriesDescription")
                for s in orthanc.get("/series?expand") or []
                if s["MainDicomTags"].get("Modality") == "SEG"
            }
            >= {"AI segmentation v2"}
            or None
        ),
        30,
        "the amended SEG in Orthanc",
    )
    assert descriptions
    events = [e["kind"] for e in node.get(f"/api/events?study={study_uid}")]
    assert events.count("study_complete") == 2 and "study_reopened" in events


def test_rt_plan_is_forwarded_as_received(node: NodeProcess, orthanc: Orthanc) -> None:
    """The shipped forward-only rule: an RT plan goes on to the PACS unchanged."""
    plan = SHARED_DICOM / "rt-dicompyler/tests/testdata/example_data/rtplan.dcm"
    ds = pydicom.dcmread(plan)
    assert storescu(node.dimse_port, [plan]).returncode == 0
    job = wait_for(
        lambda: (j := job_for(node, ds.StudyInstanceUID)) and j["state"] == "done" and j,
        60,
        "the forward job",
    )
    assert job["rule"] == "forward-rt-plans-and-doses"
    assert [o["kind"] for o in job["outputs"]] == ["ORIGINAL"]
    found = (
        orthanc.get(
            f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances"
        )
        or []
    )
    assert [i["00080018"]["Value"][0] for i in found] == [ds.SOPInstanceUID]


# Last: it stops the module's node.
def test_ctrl_c_stops_everything_triton_included(node: NodeProcess) -> None:
    pid = node.get("/api/health")["triton_pid"]
    assert pid
    code = stop_process(node.process, signal.SIGINT)
    assert code in (0, 130, -signal.SIGINT), node.log_text()[-2000:]

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") >= 0

    wait_for(gone, 15, "tritonserver to exit")
