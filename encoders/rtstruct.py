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
from dataclasses import dataclass

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
    in_threads,
)
from encoders.contours import Contours, trace

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


# Coordinates are written to the micrometre ("%.3f"): at most 9 digits before the point, so
# every value fits the 16 bytes a DS may hold.
_MAX_COORDINATE_MM = 1e9
_POWERS = 10 ** np.arange(9, dtype=np.int64)


def decimal_strings(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value as the DS text "%.3f" writes (to the micrometre; negative zero as "0.000"),
    every value followed by a backslash, in a few array passes instead of a Python format
    per value (a multi-organ RTSTRUCT has a million coordinates): the text's bytes, and
    where each value's text ends (its separator excluded)."""
    values = np.asarray(values, dtype=float).ravel()
    if not np.isfinite(values).all() or (
        values.size and np.abs(values).max() >= _MAX_COORDINATE_MM
    ):
        raise EncodeError("a contour lies outside any patient coordinate a DS can hold")
    if values.size <= _CHUNK:
        return _decimal_chunk(values)
    # a chunk at a time: the passes' working arrays (about 80 bytes a value) stay small
    texts, ends, offset = [], [], 0
    for start in range(0, values.size, _CHUNK):
        text, end = _decimal_chunk(values[start : start + _CHUNK])
        texts.append(text)
        ends.append(end + offset)
        offset += len(text)
    return np.concatenate(texts), np.concatenate(ends)


_CHUNK = 1 << 16  # values formatted at once


def _decimal_chunk(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scaled = values * 1000.0
    q = np.rint(scaled)
    # where the product's own rounding may have moved a value across a tie, Python's
    # correctly rounded format decides (a few values in a thousand)
    tie = np.flatnonzero(np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) < 1e-6)
    q[tie] = [round(float(f"{v:.3f}") * 1000.0) for v in values[tie].tolist()]
    q = q.astype(np.int64)
    negative = q < 0
    whole, fraction = np.divmod(np.abs(q), 1000)
    whole, fraction = whole.astype(np.int32), fraction.astype(np.int32)
    digits = np.asarray(np.searchsorted(_POWERS[1:], whole, side="right"), dtype=np.int64) + 1
    most = int(digits.max()) if len(digits) else 1
    # columns: sign, `most` digits, ".", 3 digits, separator; unused ones stay 0, dropped
    chars = np.zeros((len(values), most + 6), dtype=np.uint8)
    chars[:, -1] = ord("\\")
    chars[:, -2] = 48 + fraction % 10
    chars[:, -3] = 48 + fraction // 10 % 10
    chars[:, -4] = 48 + fraction // 100
    chars[:, -5] = ord(".")
    rest = whole
    for d in range(most):
        rest, digit = np.divmod(rest, 10)
        chars[:, most - d] = np.where(digits > d, 48 + digit, 0)
    rows = np.flatnonzero(negative)
    chars[rows, most - digits[rows]] = ord("-")
    text = chars[chars != 0]
    ends = np.cumsum(digits + 5 + negative) - 1
    return text, ends


@dataclass(frozen=True)
class _Geometry:
    """Each slice's placement, read once: the patient position of its first pixel, and the
    patient-space step (mm) of one column and of one row."""

    origin: np.ndarray  # (slices, 3)
    column_step: np.ndarray  # (slices, 3): along a row, one column further
    row_step: np.ndarray  # (slices, 3): down a column, one row further

    @classmethod
    def of(cls, images: Sequence[Dataset]) -> _Geometry:
        """The geometry of ``images``, one slice each."""
        origin = np.array([[float(v) for v in im.ImagePositionPatient] for im in images])
        iop = np.array([[float(v) for v in im.ImageOrientationPatient] for im in images])
        spacing = np.array([[float(v) for v in im.PixelSpacing] for im in images])
        return cls(origin, iop[:, :3] * spacing[:, 1:2], iop[:, 3:] * spacing[:, 0:1])

    def to_patient(self, slices: np.ndarray, points_rc: np.ndarray) -> np.ndarray:
        """(row, column) points on the given slices to patient coordinates (mm), (N, 3)."""
        return (
            self.origin[slices]
            + points_rc[:, 1:2] * self.column_step[slices]
            + points_rc[:, 0:1] * self.row_step[slices]
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


def _degenerate_contours(traced: Contours) -> np.ndarray:
    """:func:`_degenerate` for every contour at once: a boolean per contour."""
    sizes = np.diff(traced.starts)
    if not len(sizes) or not len(traced.points):
        return sizes < 3
    owner = np.repeat(np.arange(len(sizes)), sizes)
    index = np.arange(len(traced.points))
    first = traced.starts[:-1][owner]
    prev = np.where(index == first, traced.starts[1:][owner] - 1, index - 1)
    y, x = traced.points[:, 0], traced.points[:, 1]
    cross = x * y[prev] - y * x[prev]
    starts = np.minimum(traced.starts[:-1], len(index) - 1)
    twice_area = np.where(sizes > 0, np.add.reduceat(cross, starts), 0.0)
    return (sizes < 3) | (np.abs(twice_area) < 1e-6)


def _contour_sequence(
    structure: Structure,
    geometry: _Geometry,
    refs: Sequence[bytes],
) -> tuple[list[bytes], int]:
    """The Contour Sequence's items, encoded (:mod:`encoders.rawbytes`): a few hundred
    thousand coordinates on a large CT, which pydicom would hold and write value by value.
    Every contour's points are placed, and written as text, in one array pass."""
    traced = trace(structure.mask, structure.box)
    degenerate = _degenerate_contours(traced)
    xyz = geometry.to_patient(np.repeat(traced.slices, np.diff(traced.starts)), traced.points)
    text, ends = decimal_strings(xyz)
    raw = text.tobytes()
    # value v's text runs from just after value v - 1's separator to ends[v]
    begins = np.concatenate([[0], ends + 1])
    items = []
    closed = rb.text(0x30060042, "CS", "CLOSED_PLANAR")
    for n in np.flatnonzero(~degenerate).tolist():
        a, b = int(traced.starts[n]), int(traced.starts[n + 1])
        data = raw[int(begins[3 * a]) : int(ends[3 * b - 1])]
        items.append(
            rb.item(
                rb.sequence(0x30060016, [refs[int(traced.slices[n])]])  # Contour Image Sequence
                + closed
                + rb.text(0x30060046, "IS", str(b - a))  # Number of Contour Points
                + rb.element(0x30060050, "DS", data)
            )
        )
    return items, int(degenerate.sum())


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
    geometry = _Geometry.of(source_images)
    rb.put_sequence(rt_series, 0x30060016, refs)  # Contour Image Sequence: every instance
    rt_study = Dataset()
    rt_study.ReferencedSOPClassUID = STUDY_COMPONENT_MANAGEMENT
    rt_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    rt_study.RTReferencedSeriesSequence = DicomSequence([rt_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = DicomSequence([rt_study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    # each structure's contours traced and written on the encoders' threads, in order
    found = [s for s in structures if s.found]
    traced = iter(in_threads(lambda s: _contour_sequence(s, geometry, refs), found))
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
            items, degenerate = next(traced)
            rb.put_sequence(contour, 0x30060040, items)  # Contour Sequence
            if dropped is not None and degenerate:
                dropped[s.spec.name] = dropped.get(s.spec.name, 0) + degenerate
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
