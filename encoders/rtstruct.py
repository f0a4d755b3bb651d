"""RT Structure Set (PS3.3 A.19) with pydicom; highdicom has no RTSTRUCT.

Contours are closed planar polygons in patient coordinates, one per boundary of the mask in a
slice: the outer boundary of every island and the boundary of every hole are separate contours
(planning systems combine nested contours of one ROI on a slice by even-odd inclusion). Each
slice's points are computed from that slice's own ImagePositionPatient and
ImageOrientationPatient, so gantry-tilted and non-square-pixel series are placed exactly.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from encoders import rawbytes as rb
from encoders.common import (
    TYPE2_PATIENT_STUDY,
    EncodeError,
    Provenance,
    SeriesIdentity,
    Structure,
)
from encoders.contours import trace

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# Conventional Referenced SOP Class of the RT Referenced Study Sequence (Study Component
# Management / Detached Study Management), as written by planning systems.
STUDY_COMPONENT_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

# Patient / study attributes copied from the source images (type 2 ones written empty if absent).
_COPIED_OPTIONAL = (
    "SpecificCharacterSet",
    "StudyInstanceUID",
    "IssuerOfPatientID",
    "PatientAge",
    "StudyDescription",
    "OtherPatientIDs",
)


# "%.3f" keeps every value within the 16 bytes a DS may hold up to this magnitude (mm).
_MAX_COORDINATE_MM = 1e9


def _contour_data(xyz: np.ndarray) -> bytes:
    """ContourData's value, encoded at once (one C call for every value) instead of value by
    value; every value "%.3f" (at most 16 bytes, as a DS must be)."""
    if not np.isfinite(xyz).all() or np.abs(xyz).max() >= _MAX_COORDINATE_MM:
        raise EncodeError("a contour lies outside any patient coordinate a DS can hold")
    values = xyz.ravel().tolist()
    return ("\\".join(["%.3f"] * len(values)) % tuple(values)).encode("ascii")


def mask_contours(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(slice index, (N, 2) row and column) of every closed boundary of a 3D mask, in slice
    order: the outer boundary of every island and the boundary of every hole."""
    traced = trace(mask)
    return [(int(traced.slices[n]), traced.contour(n)) for n in range(len(traced))]


def to_patient(points_rc: np.ndarray, image: Dataset) -> np.ndarray:
    """(row, column) pixel coordinates of ``image`` to patient coordinates (mm), (N, 3)."""
    iop = np.asarray(image.ImageOrientationPatient, dtype=float)
    origin = np.asarray(image.ImagePositionPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in image.PixelSpacing)
    along_row, along_col = iop[:3], iop[3:]
    return (
        origin
        + np.outer(points_rc[:, 1] * col_spacing, along_row)
        + np.outer(points_rc[:, 0] * row_spacing, along_col)
    )


def _image_ref(image: Dataset) -> bytes:
    """A reference to a slice, as an encoded item: its instance, and its frame when it is one
    frame of a multi-frame image (the volume's per-frame views carry ReferencedFrameNumber)."""
    ref = rb.sop_reference(image)
    if "ReferencedFrameNumber" in image:
        ref += rb.text(0x00081160, "IS", str(int(image.ReferencedFrameNumber)))
    return rb.item(ref)


def _keep_encoded_parts_raw(ds: Dataset) -> None:
    """Declare the encoding of the datasets that hold encoded parts, and of the object, so
    that pydicom writes those as they are instead of parsing them back into elements first
    (nothing here has an ambiguous VR for pydicom to correct)."""
    rb.written_as_is(ds)
    for roi in ds.ROIContourSequence:
        rb.written_as_is(roi)
    for frame in ds.ReferencedFrameOfReferenceSequence:
        for study in frame.RTReferencedStudySequence:
            for series in study.RTReferencedSeriesSequence:
                rb.written_as_is(series)


def _degenerate(rc: np.ndarray) -> bool:
    """A contour planning systems refuse: fewer than 3 points, or no area (all on one line,
    or fewer than 3 distinct points)."""
    if len(rc) < 3:
        return True
    x, y = rc[:, 1], rc[:, 0]
    return bool(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) < 1e-6)


def _contour_sequence(
    structure: Structure,
    images: Sequence[Dataset],
    refs: Sequence[bytes],
    dropped: dict[str, int] | None,
) -> list[bytes]:
    """The Contour Sequence's items, encoded (:mod:`encoders.rawbytes`): a few hundred
    thousand coordinates on a large CT, which pydicom would hold and write value by value."""
    items = []
    closed = rb.text(0x30060042, "CS", "CLOSED_PLANAR")
    for k, rc in mask_contours(structure.mask):
        if _degenerate(rc):
            if dropped is not None:
                dropped[structure.spec.name] = dropped.get(structure.spec.name, 0) + 1
            continue
        xyz = to_patient(rc, images[k])
        items.append(
            rb.item(
                rb.sequence(0x30060016, [refs[k]])  # Contour Image Sequence
                + closed
                + rb.text(0x30060046, "IS", str(len(xyz)))  # Number of Contour Points
                + rb.element(0x30060050, "DS", _contour_data(xyz))
            )
        )
    return items


def build_rtstruct(
    *,
    source_images: Sequence[Dataset],
    structures: Sequence[Structure],
    provenance: Provenance,
    series: SeriesIdentity,
    label: str = "AI",
    name: str | None = None,
    description: str | None = None,
    placeholders: Sequence[Structure] = (),
    dropped: dict[str, int] | None = None,
) -> Dataset:
    """An RT Structure Set with one ROI per structure, referencing exactly ``source_images``.

    ``label`` and ``name`` are the Structure Set Label (SH) and Name (LO; the series
    description by default), ``description`` its Structure Set Description. ``placeholders``
    are structures looked for and not found that the site wants as ROIs without contours.
    Contours a planning system would refuse (fewer than 3 points, no area) are left out and
    counted per structure in ``dropped``."""
    first = source_images[0]
    if not first.get("FrameOfReferenceUID"):
        raise EncodeError("source images have no FrameOfReferenceUID: contours cannot be placed")
    now = dt.datetime.now()
    ds = Dataset()
    for kw in TYPE2_PATIENT_STUDY:
        setattr(ds, kw, first.get(kw, ""))
    for kw in _COPIED_OPTIONAL:
        if kw in first:
            setattr(ds, kw, first[kw].value)
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = series.sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = series.series_number
    ds.SeriesDescription = series.series_description
    ds.SeriesDate = ds.InstanceCreationDate
    ds.SeriesTime = ds.InstanceCreationTime
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.Manufacturer = provenance.manufacturer
    ds.ManufacturerModelName = provenance.model_name
    ds.SoftwareVersions = provenance.software_version
    ds.DeviceSerialNumber = provenance.device_serial_number
    if provenance.institution_name:
        ds.InstitutionName = provenance.institution_name
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = (name or series.series_description)[:64]
    if description:
        ds.StructureSetDescription = description[:1024]
    ds.StructureSetDate = ds.InstanceCreationDate
    ds.StructureSetTime = ds.InstanceCreationTime

    frame_uid = first.FrameOfReferenceUID
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    rt_series = Dataset()
    rt_series.SeriesInstanceUID = first.SeriesInstanceUID
    refs = [_image_ref(im) for im in source_images]
    rb.put_sequence(rt_series, 0x30060016, refs)  # Contour Image Sequence: every instance
    rt_study = Dataset()
    rt_study.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
    rt_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    rt_study.RTReferencedSeriesSequence = DicomSequence([rt_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = DicomSequence([rt_study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    rois, contours, observations = [], [], []
    for number, s in enumerate([*structures, *placeholders], start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = s.spec.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = f"{s.spec.algorithm_name} {s.spec.algorithm_version}"[:64]
        rois.append(roi)
        contour = Dataset()
        contour.ReferencedROINumber = number
        contour.ROIDisplayColor = list(s.spec.color)
        if s.found:  # a placeholder has no contour (ContourSequence is type 3)
            items = _contour_sequence(s, source_images, refs, dropped)
            rb.put_sequence(contour, 0x30060040, items)  # Contour Sequence
        contours.append(contour)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        if s.spec.observation_label:
            obs.ROIObservationLabel = s.spec.observation_label[:16]
        # the structure's identity, shared with its SEG segment and SR groups
        identity = f"Tracking ID {s.spec.tracking_id}"
        if s.spec.tracking_uid:
            identity += f"; Tracking UID {s.spec.tracking_uid}"
        obs.ROIObservationDescription = identity[:1024]
        code = Dataset()
        code.CodeValue = s.spec.type.value
        code.CodingSchemeDesignator = s.spec.type.scheme_designator
        code.CodeMeaning = s.spec.type.meaning[:64]
        obs.RTROIIdentificationCodeSequence = DicomSequence([code])
        obs.RTROIInterpretedType = s.spec.rt_roi_type.value
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    _keep_encoded_parts_raw(ds)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds
