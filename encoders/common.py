"""What every encoder needs: provenance, the structures to encode, series identity.

The encoders know nothing of models: a structure arrives as a :class:`SegmentSpec` (the codes,
name, colour, RT type and algorithm the objects write about it) and its mask, with the
measurements the SR reports. The job layer builds these from model cards.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from airouter.core.vocab import RTROIType

T = TypeVar("T")
R = TypeVar("R")

_AGE_STRING = re.compile(r"^\d{3}[DWMY]$")


class EncodeError(ValueError):
    """An object cannot be encoded from these inputs; the message says why (no PHI)."""


# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1): they
# must be present, possibly empty. Real scanners omit them; highdicom then refuses the images.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def ensure_type2(datasets: Sequence[Dataset]) -> list[str]:
    """Give in-memory source headers the type 2 attributes they lack, empty; returns which.

    Only the copies read for encoding change, never the stored instances; the objects we
    write then carry the attributes present and empty, as the standard asks.
    """
    added: set[str] = set()
    for ds in datasets:
        for keyword in TYPE2_PATIENT_STUDY:
            if keyword not in ds:
                setattr(ds, keyword, "")
                added.add(keyword)
        # Patient's Age is type 3 where we copy it; a malformed one (seen: "0Y") is dropped
        # rather than written into objects that validators would then reject.
        if "PatientAge" in ds and not _AGE_STRING.match(str(ds.PatientAge)):
            del ds.PatientAge
        _normalise_charset(ds)
    return sorted(added)


# Dates and times the objects copy from the source (Patient, General Study modules).
_COPIED_DATES = ("PatientBirthDate", "StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate")
_COPIED_TIMES = ("StudyTime", "SeriesTime", "ContentTime", "AcquisitionTime", "PatientBirthTime")
_DA = re.compile(r"^\d{8}$")
_LEGACY_DA = re.compile(r"^(\d{4})[-./](\d{2})[-./](\d{2})$")  # ACR-NEMA and hand-typed dates
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_LEGACY_TM = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2}(\.\d{1,6})?))?$")


def normalise_values(datasets: Sequence[Dataset]) -> list[str]:
    """Repair, in the in-memory source headers, dates and times the objects copy and that a
    library would refuse (a legacy ``1970-03-03``, ``12:30:00``): rewritten in DICOM form when
    the meaning is clear, emptied otherwise (they are type 2 or 3 where we copy them). Returns
    the keywords changed, never their values (they may identify the patient)."""
    changed: set[str] = set()
    for ds in datasets:
        for keywords, strict, legacy, join in (
            (_COPIED_DATES, _DA, _LEGACY_DA, lambda m: "".join(m.groups()[:3])),
            (_COPIED_TIMES, _TM, _LEGACY_TM, lambda m: "".join(g or "" for g in m.groups()[:3])),
        ):
            for keyword in keywords:
                if keyword not in ds:
                    continue
                text = _raw_text(ds, keyword)
                dates = keywords is _COPIED_DATES
                if not text or (strict.match(text) and (not dates or _valid_date(text))):
                    continue
                match = legacy.match(text)
                repaired = join(match) if match else ""
                if repaired and dates and not _valid_date(repaired):
                    repaired = ""
                setattr(ds, keyword, repaired)
                changed.add(keyword)
    return sorted(changed)


# What the encoders (and highdicom under them) read from every source image, besides the
# first one, which the objects copy from: its references, geometry and grouping.
PER_IMAGE = tuple(
    Tag(tag_for_keyword(k) or 0)
    for k in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "Modality",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "ReferencedFrameNumber",
    )
)


def drop_unreadable(
    datasets: Sequence[Dataset], *, only: Sequence[BaseTag] | None = None
) -> list[str]:
    """Decode the top-level elements of the in-memory source headers (pydicom converts on
    first access; every element, or those of ``only``), removing those it cannot convert (an
    unknown VR, a corrupt value): the objects copy only what reads. Returns the names removed
    (keywords, or tags of private and unknown elements), never a value."""
    dropped: set[str] = set()
    for ds in datasets:
        for tag in list(ds.keys()) if only is None else [t for t in only if t in ds]:
            try:
                ds[tag]
            except Exception:
                dropped.add(keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})")
                del ds[tag]
    return sorted(dropped)


# Maximum value lengths in characters (PS3.5 Table 6.2-1) of the VRs a header copies as text.
# (Numbers, DS and IS, are never shortened: that would change them.)
_MAX_CHARS = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240}
# Identifiers that link our objects to the patient and the order: kept exactly as the source
# has them even when over-long (a PACS or planning system matched the images by that value;
# a shortened one would file our result elsewhere).
IDENTIFIERS = frozenset(
    {"PatientID", "IssuerOfPatientID", "OtherPatientIDs", "AccessionNumber", "StudyID"}
)


def fit_lengths(datasets: Sequence[Dataset]) -> tuple[list[str], list[str]]:
    """Shorten over-long text values of the in-memory source headers to their VR's maximum
    (person names per component group), except identifiers, which are kept exactly. Returns
    the keywords shortened and the identifiers kept over-long (never a value)."""
    shortened: set[str] = set()
    kept: set[str] = set()
    for ds in datasets:
        for element in ds:
            vr, keyword = element.VR, element.keyword
            if element.tag.group in (0x0002, 0x7FE0) or not keyword or element.value is None:
                continue
            if vr == "PN":
                values = [str(v) for v in _as_list(element.value)]
                fitted = ["=".join(g[:64] for g in v.split("=")) for v in values]
            elif vr in _MAX_CHARS:
                values = [str(v) for v in _as_list(element.value)]
                fitted = [v[: _MAX_CHARS[vr]] for v in values]
            else:
                continue
            if fitted == values:
                continue
            if keyword in IDENTIFIERS:
                kept.add(keyword)
                continue
            element.value = fitted if len(fitted) > 1 else fitted[0]
            shortened.add(keyword)
    return sorted(shortened), sorted(kept)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _raw_text(ds: Dataset, keyword: str) -> str:
    """An element's value as text without pydicom's conversion (which refuses bad values)."""
    raw = ds.get_item(keyword)
    value = getattr(raw, "value", raw)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \x00")
    return str(value if value is not None else "").strip(" \x00")


def _valid_date(text: str) -> bool:
    try:
        dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


_HIGHDICOM_CHARSETS = {v.value for v in hd.SpecificCharacterSetValues}


def _normalise_charset(ds: Dataset) -> None:
    """An empty first value of a multi-valued Specific Character Set is the default repertoire
    with code extensions (PS3.3 C.12.1.1.2): written explicitly as "ISO 2022 IR 6", which means
    the same to every reader and which highdicom accepts. The names decode identically."""
    value = ds.get("SpecificCharacterSet")
    if isinstance(value, MultiValue | list) and len(value) > 1 and not str(value[0]).strip():
        ds.SpecificCharacterSet = ["ISO 2022 IR 6", *[str(v) for v in value[1:]]]
        value = ds.SpecificCharacterSet
    values = [str(v) for v in (value if isinstance(value, MultiValue | list) else [value])]
    if value is not None and not all(v in _HIGHDICOM_CHARSETS for v in values):
        # A defined term highdicom does not list (e.g. ISO 2022 IR 149, Korean): decode every
        # text value with the source's character set, then say UTF-8, which holds any name.
        ds.decode()
        ds.SpecificCharacterSet = "ISO_IR 192"


@dataclass(frozen=True)
class Provenance:
    """General Equipment of the objects we write; from configuration, never literals."""

    manufacturer: str
    model_name: str
    software_version: str
    device_serial_number: str
    institution_name: str | None = None


@dataclass(frozen=True)
class SegmentSpec:
    """How the objects describe one structure: SEG segment, SR finding, RTSTRUCT ROI."""

    name: str  # segment label, ROI name
    category: CodedConcept  # Segmented Property Category
    type: CodedConcept  # Segmented Property Type; the SR's finding type
    color: tuple[int, int, int]  # RGB, the ROI display colour
    rt_roi_type: RTROIType
    algorithm_name: str  # the model's name
    algorithm_version: str  # its version (and the card's checksum)
    tracking_id: str  # stable across versions of the results: "model:label"
    # One UID per structure and job, shared by its SEG segment, SR groups and RTSTRUCT ROI.
    tracking_uid: str = ""
    observation_label: str = ""  # the RTSTRUCT's ROIObservationLabel (SH), if any


Box = tuple[slice, slice, slice]  # (slices, rows, columns) of a 3D mask


def plain_dataset(ds: Dataset) -> Dataset:
    """``ds``'s elements, file meta and preamble in a plain pydicom Dataset (highdicom's
    classes keep a parsed view of what they were built from, which edits leave stale)."""
    plain = Dataset()
    for element in ds:
        plain.add(element)
    plain.file_meta, plain.preamble = ds.file_meta, ds.preamble
    return plain


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="encode")


def in_threads(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``fn`` of each item, in order, on the encoders' threads (one per core) where there is
    more than one item: for work done mostly in array passes, which let the interpreter go
    (tracing 20 structures of a 500-slice CT: 1.1 -> 0.8 s on 2 cores)."""
    if len(items) < 2 or threading.current_thread().name.startswith("encode"):
        return [fn(item) for item in items]  # one item, or already on one of the threads
    return list(_pool().map(fn, items))


def _or_words(planes: np.ndarray) -> np.ndarray:
    """Bitwise OR of the bytes of (n, m) uint8 ``planes`` along axis 0, eight bytes at a time
    where the row length allows (a 500-slice mask: 2 ms instead of 6-60 ms for ``any``)."""
    if planes.shape[1] % 8 == 0 and planes.flags.c_contiguous:
        words = np.bitwise_or.reduce(planes.view(np.uint64), axis=0)
        return np.asarray(words).view(np.uint8)
    return np.bitwise_or.reduce(planes, axis=0)


def bounding_box(mask: np.ndarray) -> Box | None:
    """The bounding box of a 3D boolean mask, None if it is empty: the occupied slices first
    (one pass over the mask, as 64-bit words), then rows and columns within those slices."""
    mask = np.asarray(mask, dtype=bool)
    n, rows, columns = mask.shape
    if mask.size == 0:  # a structure looked for on no grid at all (a report of a rejection)
        return None
    if mask.flags.c_contiguous and (rows * columns) % 8 == 0:
        per_slice = mask.reshape(n, -1).view(np.uint64).max(axis=1) != 0
    else:
        per_slice = mask.any(axis=(1, 2))
    occupied = np.flatnonzero(per_slice)
    if occupied.size == 0:
        return None
    k = slice(int(occupied[0]), int(occupied[-1]) + 1)
    sub = mask[k]
    plane = _or_words(np.ascontiguousarray(sub).reshape(sub.shape[0], -1).view(np.uint8))
    plane = plane.reshape(rows, columns) != 0
    r = np.flatnonzero(plane.any(axis=1))
    c = np.flatnonzero(plane.any(axis=0))
    return k, slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1)


@dataclass(frozen=True)
class Structure:
    """One structure of a job's result: its spec, its mask on the source grid and what the SR
    reports of it (volume, attenuation), each computed once by the caller."""

    spec: SegmentSpec
    mask: np.ndarray  # bool, (slices, rows, columns) in the order of the images given
    volume_ml: float | None = None
    intensities_hu: tuple[float, float, float] | None = None  # mean, min, max
    probability: np.ndarray | None = None  # uint8 0-255 on the same grid (FRACTIONAL SEG)

    @functools.cached_property
    def box(self) -> Box | None:
        """The mask's bounding box (None if empty), computed once: every encoder works
        within it."""
        return bounding_box(self.mask)

    @functools.cached_property
    def found(self) -> bool:
        """Whether the model found the structure at all (asked often: computed once)."""
        return self.box is not None


@dataclass(frozen=True)
class PriorStudy:
    """The patient's previous comparable study and what the same models found in it: the SR
    reports each structure's prior volume and its change (``encoders.sr``)."""

    study_uid: str
    study_date: str  # DA
    interval_days: int  # from the prior study to this one
    images: Sequence[Dataset]  # the prior series' images (the SR's Pertinent Other Evidence)
    volumes: Mapping[str, float]  # tracking identifier -> volume (ml) in the prior study
    model_versions: Mapping[str, str] = field(default_factory=dict)  # model -> version run


@dataclass(frozen=True)
class Classification:
    """A classification model's answer on one finding: its score and the threshold above
    which the finding is Present."""

    spec: SegmentSpec
    score: float
    threshold: float


@dataclass(frozen=True)
class SeriesIdentity:
    """The new series (and instance) an output is written as."""

    series_instance_uid: str
    series_number: int
    series_description: str
    sop_instance_uid: str
