"""Encoders round-trip: build, write, read back, compare; dciodvfy and dsrdump on the bytes."""

from __future__ import annotations

import copy
import io
import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from encoders.common import (
    Classification,
    EncodeError,
    Provenance,
    SeriesIdentity,
    Structure,
    ensure_type2,
)
from encoders.rtstruct import build_rtstruct
from encoders.seg import build_probability_seg, build_seg
from encoders.sr import _check_references, build_measurement_report
from inference.cards import load_cards
from tests.objects import build_all, structure
from tests.peers import ROOT, head_ct_files, tool
from tests.raster import dice, rasterize_rtstruct

PROVENANCE = Provenance("Test Maker", "test-model", "9.9.9", "SN-1", "Test Hospital")


def _tilted(images: list[Dataset], degrees: float, spacing: tuple[float, float]) -> list[Dataset]:
    """Re-describe a series as gantry-tilted with non-square pixels (geometry only)."""
    t = np.radians(degrees)
    col_dir = np.array([0.0, np.cos(t), -np.sin(t)])
    out = []
    for k, ds in enumerate(images):
        d = copy.deepcopy(ds)
        d.ImageOrientationPatient = [1.0, 0.0, 0.0, *col_dir.round(6).tolist()]
        d.PixelSpacing = list(spacing)
        d.ImagePositionPatient = [-100.0, -100.0 + k * 1.0 * np.tan(t), 50.0 + k * 1.0]
        out.append(d)
    return out


@pytest.fixture(scope="module")
def ct() -> list[Dataset]:
    files = head_ct_files()[60:72]  # 12 real slices keep the test fast
    return [pydicom.dcmread(f) for f in files]


def _structures(n: int, rows: int, cols: int) -> list[Structure]:
    cards = load_cards(ROOT / "config" / "models")
    ring = np.zeros((n, rows, cols), dtype=bool)
    ring[2:9, 100:300, 120:320] = True
    ring[2:9, 150:250, 170:270] = False  # a hole
    islands = np.zeros_like(ring)
    islands[4:7, 50:90, 50:90] = True
    islands[4:7, 400:460, 380:470] = True  # two islands on each slice
    return [
        structure(cards["ct-body"], cards["ct-body"].labels[0], ring),
        structure(cards["ct-lungs"], cards["ct-lungs"].labels[0], islands),
    ]


def _validate(path: Path) -> None:
    out = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
    errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
    assert errors == [], errors


def _valid_sr_dump(sr: Dataset, path: Path) -> str:
    """Write the SR, check it with dciodvfy, and return what dsrdump makes of it."""
    sr.save_as(path)
    _validate(path)
    dump = subprocess.run([tool("dsrdump"), str(path)], capture_output=True, text=True, check=False)
    assert dump.returncode == 0, dump.stderr
    return dump.stdout


@pytest.mark.parametrize("geometry", ["as-acquired", "tilted-non-square"])
def test_seg_sr_rtstruct_round_trip(ct: list[Dataset], geometry: str, tmp_path: Path) -> None:
    images = ct
    if geometry == "tilted-non-square":
        images = _tilted(ct, 15.0, (0.5, 0.8))
    structures = _structures(len(images), images[0].Rows, images[0].Columns)
    seg = build_seg(
        source_images=images,
        structures=structures,
        provenance=PROVENANCE,
        series=SeriesIdentity(hd.UID(), 901, "AI segmentation", hd.UID()),
    )
    seg.save_as(tmp_path / "seg.dcm")
    _validate(tmp_path / "seg.dcm")
    back = hd.seg.segread(tmp_path / "seg.dcm")
    sops = [ds.SOPInstanceUID for ds in images]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=sops, segment_numbers=[1, 2], assert_missing_frames_are_empty=True
    )
    for n, s in enumerate(structures):
        assert np.array_equal(pixels[..., n].astype(bool), s.mask)
    assert back.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "38266002"
    assert back.Manufacturer == "Test Maker" and back.SoftwareVersions == "9.9.9"
    algorithm = back.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "ct-body" and "card:" in algorithm.AlgorithmVersion

    voxel_ml = (
        float(np.prod([float(v) for v in images[0].PixelSpacing]))
        * np.linalg.norm(
            np.subtract(images[1].ImagePositionPatient, images[0].ImagePositionPatient)
        )
        / 1000
    )
    if geometry == "tilted-non-square":
        voxel_ml *= np.cos(np.radians(15.0))  # slice spacing along the normal
    volumes = [float(s.mask.sum()) * voxel_ml for s in structures]
    intensities = [(40.5, -120.0, 300.0), (-850.25, -1000.0, -400.0)]
    measured = [
        replace(s, volume_ml=v, intensities_hu=i)
        for s, v, i in zip(structures, volumes, intensities, strict=True)
    ]
    sr = build_measurement_report(
        source_images=images,
        seg=seg,
        structures=measured,
        provenance=PROVENANCE,
        device_uid=hd.UID(),
        series=SeriesIdentity(hd.UID(), 902, "AI measurements", hd.UID()),
        planar_slices=images,
    )
    assert "Volume" in _valid_sr_dump(sr, tmp_path / "sr.dcm")
    report = hd.sr.srread(tmp_path / "sr.dcm")
    # the evidence: every source image and the SEG; a measurement that references anything
    # else is refused (the SR is built from a stub of its tree: the check is ours)
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {*sops, str(seg.SOPInstanceUID)}
    tampered = copy.deepcopy(sr)
    stack = [
        i for i in tampered.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    while stack:
        item = stack.pop()
        if "ReferencedSOPSequence" in item:
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = hd.UID()
            break
        stack.extend(item.get("ContentSequence", []))
    with pytest.raises(EncodeError, match="not among its evidence"):
        _check_references(tampered, images, seg)
    groups = report.content.get_volumetric_roi_measurement_groups()
    # one identity per structure: the SEG segment, its volumetric group and its planar
    # group (outline and area on its largest slice) share the tracking UID
    segment_uids = [str(item.TrackingUID) for item in seg.SegmentSequence]
    assert [str(g.tracking_uid) for g in groups] == segment_uids
    planar = report.content.get_planar_roi_measurement_groups()
    assert [str(g.tracking_uid) for g in planar] == segment_uids
    for group, s in zip(planar, structures, strict=True):
        (area,) = group.get_measurements(name=codes.SCT.Area)
        spacing = [float(v) for v in images[0].PixelSpacing]
        largest = int(s.mask.reshape(len(s.mask), -1).sum(axis=1).max())
        assert area.value == pytest.approx(largest * spacing[0] * spacing[1], rel=1e-3)
    got = [g.get_measurements(name=codes.SCT.Volume)[0].value for g in groups]
    assert got == pytest.approx(volumes, rel=1e-3)
    for group, expected in zip(groups, intensities, strict=True):
        hu = group.get_measurements(name=codes.DCM.AttenuationCoefficient)
        by_derivation = {m.derivation.meaning: m.value for m in hu}  # type: ignore[union-attr]
        assert by_derivation == pytest.approx(
            dict(zip(("Mean", "Minimum", "Maximum"), expected, strict=True))
        )
        assert hu[0].unit.value == "[hnsf'U]"

    rt = build_rtstruct(
        source_images=images,
        structures=structures,
        provenance=PROVENANCE,
        series=SeriesIdentity(hd.UID(), 903, "AI structures", hd.UID()),
    )
    rt.save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    _validate(tmp_path / "rt.dcm")
    rt_back = pydicom.dcmread(tmp_path / "rt.dcm")
    masks = rasterize_rtstruct(rt_back, images)  # asserts every point lies on its image plane
    for s in structures:
        assert dice(masks[s.spec.name], s.mask) >= 0.98, s.spec.name
    types = [o.RTROIInterpretedType for o in rt_back.RTROIObservationsSequence]
    assert types == ["EXTERNAL", "ORGAN"]
    contour_images = (
        rt_back.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
        .ContourImageSequence
    )
    assert [c.ReferencedSOPInstanceUID for c in contour_images] == sops
    islands = [
        c
        for c in rt_back.ROIContourSequence[1].ContourSequence
        if c.ContourImageSequence[0].ReferencedSOPInstanceUID == sops[5]
    ]
    assert len(islands) == 2
    ring = [
        c
        for c in rt_back.ROIContourSequence[0].ContourSequence
        if c.ContourImageSequence[0].ReferencedSOPInstanceUID == sops[5]
    ]
    assert len(ring) == 2  # the outer boundary and the hole


def test_seg_refuses_an_empty_result(ct: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        build_seg(
            source_images=ct,
            structures=[],
            provenance=PROVENANCE,
            series=SeriesIdentity(hd.UID(), 901, "x", hd.UID()),
        )


def test_images_without_type2_attributes_still_give_valid_results(
    ct: list[Dataset], tmp_path: Path
) -> None:
    from encoders.common import TYPE2_PATIENT_STUDY, ensure_type2

    images = [copy.deepcopy(ds) for ds in ct[:4]]
    for ds in images:
        for keyword in TYPE2_PATIENT_STUDY:
            if keyword in ds:
                delattr(ds, keyword)
    assert set(ensure_type2(images)) == set(TYPE2_PATIENT_STUDY)
    structures = _structures(len(images), images[0].Rows, images[0].Columns)
    structures = [replace(s, mask=s.mask[:4] | True) for s in structures[:1]]
    seg, sr, rt = build_all(images, structures, PROVENANCE)
    for name, ds in (("seg", seg), ("sr", sr), ("rt", rt)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        _validate(path)
        back = pydicom.dcmread(path)
        assert "PatientBirthDate" in back and back.PatientBirthDate == ""


def test_rtstruct_on_real_gantry_tilted_ct_keeps_points_on_their_planes(tmp_path: Path) -> None:
    """dicom2nifti's gantry-tilted CT (14 degrees): each contour point lies on its own image
    plane (rt-utils puts them up to 20 mm off with one affine per series)."""
    from inference.algorithms import segment_body
    from inference.volume import build_volume
    from tests.peers import SHARED_DICOM

    folder = SHARED_DICOM / "odd/dicom2nifti/tests/data/failing/gantrytilting/001"
    volume = build_volume(sorted(folder.iterdir()))
    with pytest.raises(EncodeError, match="no FrameOfReferenceUID"):  # anonymised away here
        build_rtstruct(
            source_images=volume.datasets,
            structures=[],
            provenance=PROVENANCE,
            series=SeriesIdentity(hd.UID(), 903, "x", hd.UID()),
        )
    frame = hd.UID()
    for ds in volume.datasets:
        ds.FrameOfReferenceUID = frame
    ensure_type2(volume.datasets)  # as the pipeline does: drops its malformed PatientAge "0Y"
    assert "PatientAge" not in volume.datasets[0]
    iop = [float(v) for v in volume.datasets[0].ImageOrientationPatient]
    assert abs(iop[5]) > 0.2  # really tilted
    cards = load_cards(ROOT / "config" / "models")
    assert not segment_body(volume.hu, volume.affine).any()  # its pixels hold no tissue
    rows, cols = np.ogrid[:512, :512]
    body = np.broadcast_to((rows - 250) ** 2 + (cols - 260) ** 2 < 150**2, volume.hu.shape).copy()
    rt = build_rtstruct(
        source_images=volume.datasets,
        structures=[structure(cards["ct-body"], cards["ct-body"].labels[0], body)],
        provenance=PROVENANCE,
        series=SeriesIdentity(hd.UID(), 903, "AI structures", hd.UID()),
    )
    rt.save_as(tmp_path / "rt.dcm", enforce_file_format=True)
    _validate(tmp_path / "rt.dcm")
    back = pydicom.dcmread(tmp_path / "rt.dcm")
    by_sop = {ds.SOPInstanceUID: ds for ds in volume.datasets}
    worst = 0.0
    for contour in back.ROIContourSequence[0].ContourSequence:
        image = by_sop[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        o = np.asarray(image.ImageOrientationPatient, float)
        normal = np.cross(o[:3], o[3:])
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        offsets = (points - np.asarray(image.ImagePositionPatient, float)) @ normal
        worst = max(worst, float(np.abs(offsets).max()))
    assert worst < 0.1, f"a contour point is {worst:.3f} mm off its image plane"
    assert dice(rasterize_rtstruct(back, volume.datasets)["Body"], body) >= 0.98


@pytest.mark.parametrize("with_found", [True, False])
def test_sr_reports_structures_the_model_did_not_find(
    ct: list[Dataset], tmp_path: Path, with_found: bool
) -> None:
    """An empty result is a result: each structure not found is reported "Absent"; with
    nothing found at all there is no SEG and the SR stands alone."""
    images = ct[:4]
    structures = _structures(len(images), images[0].Rows, images[0].Columns)
    body = replace(structures[0], mask=structures[0].mask[:4])
    cards = load_cards(ROOT / "config" / "models")
    lungs = [
        structure(cards["ct-lungs"], lab, np.zeros_like(body.mask))
        for lab in cards["ct-lungs"].labels
    ]
    found = [body] if with_found else []
    seg = None
    if found:
        seg = build_seg(
            source_images=images,
            structures=found,
            provenance=PROVENANCE,
            series=SeriesIdentity(hd.UID(), 901, "AI segmentation", hd.UID()),
        )
    sr = build_measurement_report(
        source_images=images,
        seg=seg,
        structures=[replace(s, volume_ml=1.0) for s in found],
        absent=[s.spec for s in lungs],
        provenance=PROVENANCE,
        device_uid=hd.UID(),
        series=SeriesIdentity(hd.UID(), 902, "AI measurements", hd.UID()),
    )
    assert _valid_sr_dump(sr, tmp_path / "sr.dcm").count("Absent") == 2
    report = hd.sr.srread(tmp_path / "sr.dcm")
    assert len(report.content.get_volumetric_roi_measurement_groups()) == len(found)


# dicom3tools in Debian 12 (2022-06-18) predates the Label Map Segmentation IOD (2024): it
# cannot find the IOD and reads Segment Number 0 (the label map's background) as a numbering
# error. These two lines are all it may say about our LABELMAP SEG; any other error fails.
LABELMAP_UNKNOWN_TO_DCIODVFY = {
    "Error - Information Object Not found",
    "Error - SegmentNumber not monotonically increasing from one by one - have SegmentSequence "
    "item number 1 (from one) with SegmentNumber of 0",
}


def _dciodvfy_errors(path: Path) -> set[str]:
    out = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, check=False)
    text = (out.stdout + out.stderr).decode("utf-8", errors="replace")  # it echoes raw values
    return {ln for ln in text.splitlines() if ln.startswith("Error")}


def test_labelmap_seg_round_trips_and_refuses_overlapping_structures(
    ct: list[Dataset], tmp_path: Path
) -> None:
    structures = _structures(len(ct), ct[0].Rows, ct[0].Columns)
    seg = build_seg(
        source_images=ct,
        structures=structures,
        provenance=PROVENANCE,
        series=SeriesIdentity(hd.UID(), 901, "AI segmentation", hd.UID()),
        seg_type="labelmap",
    )
    seg.save_as(tmp_path / "labelmap.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    assert _dciodvfy_errors(tmp_path / "labelmap.dcm") <= LABELMAP_UNKNOWN_TO_DCIODVFY
    back = hd.seg.segread(tmp_path / "labelmap.dcm")
    assert back.SegmentationType == "LABELMAP"
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in ct],
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    )
    for n, s in enumerate(structures):
        assert np.array_equal(pixels[..., n].astype(bool), s.mask)
    # the SR can reference the label map's segments
    sr = build_measurement_report(
        source_images=ct,
        seg=seg,
        structures=[
            replace(s, volume_ml=v, intensities_hu=(0.0, 0.0, 0.0))
            for s, v in zip(structures, [1.0, 2.0], strict=True)
        ],
        provenance=PROVENANCE,
        device_uid=hd.UID(),
        series=SeriesIdentity(hd.UID(), 902, "AI measurements", hd.UID()),
    )
    sr.save_as(tmp_path / "sr.dcm")
    # the same gap: it does not count the Label Map SOP class among segmentations
    assert _dciodvfy_errors(tmp_path / "sr.dcm") <= {
        "Error - Shall not be present for Referenced SOP Class that is not segmentation - "
        "attribute <ReferencedSegmentNumber>"
    }
    report = hd.sr.srread(tmp_path / "sr.dcm")
    (group, _) = report.content.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_class_uid == seg.SOPClassUID  # type: ignore[union-attr]

    body = replace(structures[0], mask=structures[0].mask.copy())
    inside = replace(structures[1], mask=body.mask & ~np.roll(body.mask, 5))
    with pytest.raises(EncodeError, match=r"mutually exclusive.*overlap"):
        build_seg(
            source_images=ct,
            structures=[body, inside],
            provenance=PROVENANCE,
            series=SeriesIdentity(hd.UID(), 901, "x", hd.UID()),
            seg_type="labelmap",
        )


def test_fractional_seg_carries_the_probability_map(ct: list[Dataset], tmp_path: Path) -> None:
    structures = _structures(len(ct), ct[0].Rows, ct[0].Columns)
    _, j, i = np.ogrid[: len(ct), : ct[0].Rows, : ct[0].Columns]
    smooth = np.clip(255 - np.hypot(j - 200, i - 220) * 2, 0, 255).astype(np.uint8)
    first = np.broadcast_to(smooth, structures[0].mask.shape).copy()
    probabilities = [first, np.zeros_like(first)]
    probabilities[1][4:7, 50:90, 50:90] = 255
    seg = build_probability_seg(
        source_images=ct,
        structures=[
            replace(s, probability=p) for s, p in zip(structures, probabilities, strict=True)
        ],
        provenance=PROVENANCE,
        series=SeriesIdentity(hd.UID(), 904, "AI probability map", hd.UID()),
    )
    seg.save_as(tmp_path / "fractional.dcm")
    _validate(tmp_path / "fractional.dcm")
    back = hd.seg.segread(tmp_path / "fractional.dcm")
    assert back.SegmentationType == "FRACTIONAL"
    assert back.SegmentationFractionalType == "PROBABILITY" and back.MaximumFractionalValue == 255
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in ct],
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
        rescale_fractional=False,
    )
    for n, p in enumerate(probabilities):
        assert np.array_equal(pixels[..., n], p)  # 0-255 exactly as the model gave them


CHARSET_FILES = [
    "chrGerm.dcm",  # ISO_IR 100
    "chrRuss.dcm",  # ISO_IR 144
    "chrGreek.dcm",  # ISO_IR 126
    "chrHbrw.dcm",  # ISO_IR 138
    "chrArab.dcm",  # ISO_IR 127
    "chrX1.dcm",  # ISO_IR 192 (UTF-8)
    "chrX2.dcm",  # GB18030
    "chrH31.dcm",  # ISO 2022 IR 87 (Japanese, three component groups)
    "chrI2.dcm",  # ISO 2022 IR 149 (Korean)
]


@pytest.mark.parametrize("name", CHARSET_FILES)
def test_results_carry_the_sources_names_in_a_character_set_that_holds_them(
    ct: list[Dataset], name: str, tmp_path: Path
) -> None:
    """pydicom's character-set test files give the patient's name and character set: the SEG,
    SR and RTSTRUCT written for such a study decode to the same name."""
    from pydicom.data import get_charset_files

    (source,) = [pydicom.dcmread(f) for f in get_charset_files(name)]
    images = []
    for ds in ct[:4]:
        d = copy.deepcopy(ds)
        d.SpecificCharacterSet = source.SpecificCharacterSet
        d.PatientName = source.PatientName
        d.ReferringPhysicianName = source.PatientName
        images.append(d)
    ensure_type2(images)  # the pipeline's preparation of the source headers
    structures = _structures(len(images), images[0].Rows, images[0].Columns)[:1]
    objects = build_all(images, structures, PROVENANCE)
    for kind, ds in zip(("SEG", "SR", "RTSTRUCT"), objects, strict=True):
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        assert str(back.PatientName) == str(source.PatientName), kind
        assert str(back.ReferringPhysicianName) == str(source.PatientName), kind
        charset = back.SpecificCharacterSet
        expected = source.SpecificCharacterSet
        if not isinstance(expected, str) and not expected[0]:
            expected = ["ISO 2022 IR 6", *expected[1:]]  # the same repertoire, said explicitly
        if name == "chrI2.dcm":  # highdicom does not accept ISO 2022 IR 149: UTF-8 instead
            expected = "ISO_IR 192"
        assert charset == expected, kind
        assert _dciodvfy_errors(path) == set(), kind


def test_sr_reports_classification_findings_present_or_absent_with_the_score(
    ct: list[Dataset], tmp_path: Path
) -> None:
    cards = load_cards(ROOT / "config" / "models")
    empty = np.zeros((0,), dtype=bool)
    right, left = (structure(cards["ct-lungs"], label, empty) for label in cards["ct-lungs"].labels)
    sr = build_measurement_report(
        source_images=ct,
        seg=None,
        structures=[],
        classifications=[
            Classification(right.spec, 0.8312, 0.5),
            Classification(left.spec, 0.12, 0.5),
        ],
        provenance=PROVENANCE,
        device_uid=hd.UID(),
        series=SeriesIdentity(hd.UID(), 902, "AI findings", hd.UID()),
    )
    assert "Probability" in _valid_sr_dump(sr, tmp_path / "sr.dcm")
    report = hd.sr.srread(tmp_path / "sr.dcm")  # highdicom reads it back
    assert not report.content.get_volumetric_roi_measurement_groups()
    evaluations = {}
    for item in report.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "126010":  # Imaging Measurements
            for group in item.ContentSequence:
                values = {
                    c.ConceptNameCodeSequence[0].CodeMeaning: c
                    for c in group.ContentSequence
                    if "ConceptNameCodeSequence" in c
                }
                finding = values["Finding"].ConceptCodeSequence[0].CodeMeaning
                probability = values["Probability"].MeasuredValueSequence[0].NumericValue
                (qualitative,) = [
                    c
                    for c in group.ContentSequence
                    if c.get("ValueType") == "CODE"
                    and c.ConceptNameCodeSequence[0].CodeMeaning == finding
                ]
                evaluations[finding] = (
                    qualitative.ConceptCodeSequence[0].CodeMeaning,
                    float(probability),
                )
    assert evaluations == {"Right lung": ("Present", 0.8312), "Left lung": ("Absent", 0.12)}


@pytest.mark.parametrize("overlapping", [False, True])
def test_fast_overlap_check_agrees_with_highdicom(ct: list[Dataset], overlapping: bool) -> None:
    """Our SEG skips highdicom's slow overlap sum for stacked binary masks: the Segments
    Overlap it writes must be what highdicom itself would have written."""
    structures = _structures(len(ct), ct[0].Rows, ct[0].Columns)
    if overlapping:
        shifted = np.roll(structures[0].mask, 30, axis=2)
        structures[1] = replace(structures[1], mask=shifted)
    series = SeriesIdentity(hd.UID(), 901, "x", hd.UID())
    ours = build_seg(source_images=ct, structures=structures, provenance=PROVENANCE, series=series)
    pixels = np.stack([s.mask.astype(np.uint8) for s in structures], axis=-1)
    theirs = hd.seg.Segmentation(
        source_images=ct,
        pixel_array=pixels,
        segmentation_type="BINARY",
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=s.spec.name,
                segmented_property_category=s.spec.category,
                segmented_property_type=s.spec.type,
                algorithm_type="MANUAL",
            )
            for n, s in enumerate(structures, start=1)
        ],
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="x",
        manufacturer_model_name="x",
        software_versions="1",
        device_serial_number="1",
    )
    assert ours.SegmentsOverlap == theirs.SegmentsOverlap == ("YES" if overlapping else "NO")
    assert ours.PixelData == theirs.PixelData  # the same frames, bit for bit


def _written(ds: Dataset) -> Dataset:
    """``ds`` as a receiver reads it: written as Part 10 and parsed back."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


_PER_INSTANCE = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"}
_PER_INSTANCE |= {"DimensionOrganizationUID", "ContributionDateTime"}


def _differences(ours: Dataset, theirs: Dataset, path: str = "") -> list[str]:
    """Every element (recursively) that is not the same in both, apart from creation times."""
    found = []
    for tag in sorted(set(ours.keys()) ^ set(theirs.keys())):
        found.append(f"{path}/{pydicom.datadict.keyword_for_tag(tag)} in one only")
    for tag in sorted(set(ours.keys()) & set(theirs.keys())):
        a, b = ours[tag], theirs[tag]
        if a.keyword in _PER_INSTANCE:
            continue
        if a.VR == "SQ":
            if len(a.value) != len(b.value):
                found.append(f"{path}/{a.keyword}: {len(a.value)} items, not {len(b.value)}")
                continue
            for n, (x, y) in enumerate(zip(a.value, b.value, strict=True)):
                found += _differences(x, y, f"{path}/{a.keyword}[{n}]")
        elif a.VR != b.VR or a.value != b.value:
            found.append(f"{path}/{a.keyword}: {str(a.value)[:60]} != {str(b.value)[:60]}")
    return found


@pytest.mark.parametrize("case", ["one-contiguous", "one-with-gap", "three-overlapping", "tilted"])
def test_streamed_seg_is_what_highdicom_writes(ct: list[Dataset], case: str) -> None:
    """Our BINARY SEG writes its frames, their functional groups and the source references
    itself (highdicom stacks all masks and builds every frame as datasets: seconds on a large
    CT). Written and read back, it must be exactly the SEG highdicom writes from the same
    inputs: frame order, dimension indices, positions, the bits of every frame, Segments
    Overlap, Spacing Between Slices, the 3D dimension organisation of a single structure."""
    import encoders.seg as seg_module

    images = _tilted(ct, 12.0, (0.5, 0.8)) if case == "tilted" else ct
    if case == "one-contiguous":  # in slice order, so that highdicom sees a regular volume
        images = sorted(ct, key=lambda ds: float(ds.ImagePositionPatient[2]))
    structures = _structures(len(images), images[0].Rows, images[0].Columns)
    structures = [replace(s, spec=replace(s.spec, tracking_uid=hd.UID())) for s in structures]
    if case.startswith("one"):
        mask = np.zeros_like(structures[0].mask)
        mask[3:8, 200:230, 100:160] = True
        if case == "one-with-gap":
            mask[5] = False
        structures = [replace(structures[0], mask=mask)]
    if case == "three-overlapping":
        third = np.roll(structures[0].mask, 40, axis=2)
        structures.append(replace(structures[1], mask=third))
    series = SeriesIdentity(hd.UID(), 901, "x", hd.UID())
    ours = build_seg(
        source_images=images, structures=structures, provenance=PROVENANCE, series=series
    )
    assert not isinstance(ours, hd.seg.Segmentation), "the streamed path was not taken"
    original = seg_module._streamed_binary
    try:
        seg_module._streamed_binary = lambda *args: None  # type: ignore[assignment]
        theirs = build_seg(
            source_images=images, structures=structures, provenance=PROVENANCE, series=series
        )
    finally:
        seg_module._streamed_binary = original
    assert isinstance(theirs, hd.seg.Segmentation)
    ours, theirs = _written(ours), _written(theirs)
    assert _differences(ours, theirs) == []
    assert ours.NumberOfFrames == theirs.NumberOfFrames > 1
    if case == "one-contiguous":
        assert ours.DimensionOrganizationType == "3D"
    if case == "three-overlapping":
        assert ours.SegmentsOverlap == "YES"
    back = hd.seg.Segmentation.from_dataset(ours)
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in images],
        segment_numbers=list(range(1, len(structures) + 1)),
        assert_missing_frames_are_empty=True,
    )
    for n, s in enumerate(structures):
        assert np.array_equal(pixels[..., n].astype(bool), s.mask)


def _canonical(contour: np.ndarray) -> tuple[tuple[float, float], ...]:
    """A closed contour started at its smallest point (same points, same direction)."""
    first = int(np.lexsort((contour[:, 1], contour[:, 0]))[0])
    return tuple((float(r), float(c)) for r, c in np.roll(contour, -first, axis=0))


def _skimage_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """scikit-image's closed contours of a 2D mask (padded so that every one closes), without
    the repeated last point and without points where the polygon goes straight on."""
    from skimage.measure import find_contours

    contours = []
    for c in find_contours(np.pad(mask2d.astype(np.uint8), 1), 0.5):
        c = c[:-1] if len(c) > 1 and np.allclose(c[0], c[-1]) else c
        turn = np.cross(c - np.roll(c, 1, axis=0), np.roll(c, -1, axis=0) - c)
        keep = np.abs(turn) > 1e-9
        contours.append((c[keep] if keep.sum() >= 3 else c) - 1.0)
    return contours


def test_traced_contours_are_scikit_images(ct: list[Dataset]) -> None:
    """The RTSTRUCT's contour tracing (array operations over whole slabs) finds, on every
    slice, exactly the contours of scikit-image's find_contours at 0.5 on the padded slice:
    the same points in the same direction, holes and diagonal (saddle) cells included, on
    random masks and on a threshold of the real CT."""
    from encoders.common import bounding_box
    from encoders.contours import trace

    rng = np.random.default_rng(7)
    masks = [rng.random((3, 41, 53)) < p for p in (0.2, 0.5, 0.8)]
    masks.append(np.indices((2, 12, 12)).sum(axis=0) % 2 == 0)  # every cell a saddle
    single = np.zeros((1, 5, 5), dtype=bool)
    single[0, 2, 2] = True
    masks += [single, np.ones((2, 6, 7), dtype=bool)]
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ct]
    )
    masks.append(hu > 300)  # bone: many islands and holes
    deep = np.zeros((40, 30, 30), dtype=bool)  # more slices than one slab, some empty
    deep[3:37] = rng.random((34, 30, 30)) < 0.4
    deep[20] = False
    masks.append(deep)
    for mask in masks:
        traced = trace(mask)
        boxed = trace(mask, bounding_box(mask))
        assert np.array_equal(boxed.points, traced.points)
        assert np.array_equal(boxed.starts, traced.starts)
        ours: dict[int, list[tuple[tuple[float, float], ...]]] = {}
        for n in range(len(traced)):
            ours.setdefault(int(traced.slices[n]), []).append(_canonical(traced.contour(n)))
        assert list(traced.slices) == sorted(traced.slices)
        for k in range(len(mask)):
            theirs = sorted(_canonical(c) for c in _skimage_contours(mask[k]))
            assert sorted(ours.get(k, [])) == theirs, k


def test_a_masks_bounding_box_is_where_its_voxels_are() -> None:
    """The box every encoder works within: the smallest one holding every voxel of the mask,
    on word-aligned and odd shapes, views and empty masks alike."""
    from encoders.common import bounding_box

    rng = np.random.default_rng(3)
    for shape in ((5, 16, 16), (7, 9, 13), (1, 1, 1), (30, 64, 40)):
        for p in (0.0, 0.001, 0.3):
            mask = rng.random(shape) < p
            for m in (mask, mask[:, ::2], mask[1:]):
                where = np.argwhere(m)
                box = bounding_box(m)
                if not len(where):
                    assert box is None
                    continue
                assert box is not None
                expected = [
                    slice(int(where[:, a].min()), int(where[:, a].max()) + 1) for a in range(3)
                ]
                assert list(box) == expected, (shape, p)
    for shape in ((0, 0, 0), (0, 16, 16), (3, 0, 8)):  # no grid: a report of a rejection
        assert bounding_box(np.zeros(shape, dtype=bool)) is None


def test_contour_coordinates_are_written_as_printf_would() -> None:
    """The RTSTRUCT's coordinates, formatted in array passes, are the text "%.3f" writes
    (values on a rounding tie included), each within the 16 bytes of a DS; a value no DS can
    hold is refused."""
    from encoders.common import EncodeError
    from encoders.rtstruct import decimal_strings

    rng = np.random.default_rng(11)
    values = np.concatenate(
        [
            rng.uniform(-600, 600, 50000),  # more values than one chunk of the passes
            rng.integers(-2000000, 2000000, 50000) * 0.0005,  # ties at the fourth decimal
            [0.0, 0.0004, 12.5, 99.9995, 9.9996, -3.25, 999999999.4, -999999999.4],
        ]
    )
    text, ends = decimal_strings(values)
    written = text.tobytes().decode("ascii").split("\\")
    assert written[-1] == "" and len(written) == len(values) + 1
    assert written[:-1] == [f"{v:.3f}" for v in values]
    assert max(map(len, written)) <= 16
    assert ends[-1] == len(text) - 1
    assert np.array_equal(ends, np.cumsum([len(w) + 1 for w in written[:-1]]) - 1)  # separators
    assert decimal_strings(np.array([-0.0001]))[0].tobytes() == b"0.000\\"  # never "-0.000"
    for bad in (np.nan, np.inf, 1e9):
        with pytest.raises(EncodeError):
            decimal_strings(np.array([1.0, bad]))


def test_legacy_dates_and_times_in_the_source_are_repaired_not_fatal(
    ct: list[Dataset], tmp_path: Path
) -> None:
    """A hand-typed ``1970-03-03`` birth date used to fail the whole job in the SEG build; now
    the encoders write it in DICOM form, empty a date that means nothing, and say which
    attributes they changed (never the values)."""
    from airouter.core.settings import EncoderSettings
    from airouter.core.vocab import OutputKind
    from encoders.outputs import OutputRequest, SourceSeries, encode_outputs

    images = [copy.deepcopy(ds) for ds in ct[:4]]
    for ds in images:
        ds.PatientBirthDate = "1970-03-03"
        ds.StudyDate = "2020.01.02"
        ds.StudyTime = "12:30:05"
        ds.SeriesDate = "19700230"  # no such day
    (body, _) = _structures(len(images), images[0].Rows, images[0].Columns)
    body = replace(body, volume_ml=1.0, intensities_hu=(0.0, 0.0, 0.0))
    kinds = frozenset({OutputKind.SEG, OutputKind.SR, OutputKind.RTSTRUCT})
    encoded = encode_outputs(
        request=OutputRequest(kinds),
        source=SourceSeries(images),
        structures=[body],
        settings=EncoderSettings(),
        device_uid=hd.UID(),
    )
    assert [k for k, _ in encoded.objects] == ["SEG", "SR", "RTSTRUCT"]
    notes = dict(encoded.notes)
    assert notes["source_values_repaired"] == "PatientBirthDate, SeriesDate, StudyDate, StudyTime"
    assert "1970" not in str(encoded.notes)
    for kind, ds in encoded.objects:
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        _validate(path)
        back = pydicom.dcmread(path)
        assert (back.PatientBirthDate, back.StudyDate, back.StudyTime) == (
            "19700303",
            "20200102",
            "123005",
        ), kind


def test_unreadable_and_over_long_source_values_never_fail_the_job(
    ct: list[Dataset], tmp_path: Path
) -> None:
    """An unknown VR in a copied attribute (pydicom raises on access) is dropped; over-long
    descriptive text is shortened to its VR's maximum; over-long identifiers are kept exactly
    (the PACS matched the images by them); the notes name the attributes, never the values."""
    import io

    from airouter.core.settings import EncoderSettings
    from airouter.core.vocab import OutputKind
    from encoders.outputs import OutputRequest, SourceSeries, encode_outputs

    images = []
    for ds in ct[:4]:
        ds = copy.deepcopy(ds)
        ds.StudyDescription = "Study description " * 6  # LO: 64 at most
        ds.ReferringPhysicianName = "Referrer^" + "X" * 70  # PN: 64 per group
        buffer = io.BytesIO()
        ds.save_as(buffer)
        data = buffer.getvalue()
        sex = data.find(b"\x10\x00\x40\x00CS")  # (0010,0040) Patient's Sex
        assert sex > 0
        read_back = pydicom.dcmread(io.BytesIO(data[: sex + 4] + b"ZZ" + data[sex + 6 :]))
        with pytest.raises(NotImplementedError):
            read_back.PatientSex  # noqa: B018
        images.append(read_back)
    (body, _) = _structures(len(images), images[0].Rows, images[0].Columns)
    body = replace(body, volume_ml=1.0, intensities_hu=(0.0, 0.0, 0.0))
    kinds = frozenset({OutputKind.SEG, OutputKind.SR, OutputKind.RTSTRUCT})
    request, settings = OutputRequest(kinds), EncoderSettings()
    encoded = encode_outputs(
        request=request,
        source=SourceSeries(images),
        structures=[body],
        settings=settings,
        device_uid=hd.UID(),
    )
    notes = dict(encoded.notes)
    assert notes["source_values_unreadable"] == "PatientSex"
    assert notes["source_values_shortened"] == "ReferringPhysicianName, StudyDescription"
    assert "Study description" not in str(encoded.notes)
    for kind, ds in encoded.objects:
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        _validate(path)
        back = pydicom.dcmread(path)
        assert back.PatientSex == ""  # type 2: present, empty
        assert back.StudyDescription == ("Study description " * 6)[:64]

    long_ids = [copy.deepcopy(ds) for ds in ct[:4]]
    for ds in long_ids:
        ds.AccessionNumber = "ACC" + "9" * 20  # SH: 16 at most
    encoded = encode_outputs(
        request=request,
        source=SourceSeries(long_ids),
        structures=[body],
        settings=settings,
        device_uid=hd.UID(),
    )
    assert dict(encoded.notes)["source_identifiers_overlong"] == "AccessionNumber"
    for _kind, ds in encoded.objects:
        assert ds.AccessionNumber == "ACC" + "9" * 20  # as the CT has it
