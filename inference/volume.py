"""Build a 3D volume in patient coordinates from a series of single-frame images.

Slices are sorted along the slice normal (not by InstanceNumber or file name), rescale
slope/intercept are applied, and the affine maps voxel indices (k, j, i) to patient
coordinates (LPS, mm). The sorted headers are kept: encoders reference exactly these images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from airouter.core.tags import Unreadable, read, read_or_none


class VolumeError(Exception):
    """The series cannot be turned into a volume; the message says why (no PHI)."""


@dataclass
class Volume:
    """A series as one volume in modality units, with its geometry and the headers it came from."""

    hu: np.ndarray  # int16, shape (slices, rows, columns), modality units (HU for CT)
    affine: np.ndarray  # 4x4: (k, j, i, 1) -> (x, y, z, 1) in LPS mm
    # One header per slice, in the order of axis 0, with that slice's geometry. For a
    # multi-frame (enhanced) image these are per-frame views of it carrying the frame's
    # position, orientation and spacing and its ReferencedFrameNumber (never written).
    datasets: list[Dataset]
    # The instances to reference as sources (the slices' own datasets for a single-frame
    # series; the multi-frame image itself otherwise), and for a multi-frame image the frame
    # number (1-based) of each slice.
    sources: list[Dataset] | None = None
    frame_numbers: list[int] | None = None
    duplicates: int = 0  # images left out: another image of the series lies at their position

    @property
    def source_images(self) -> list[Dataset]:
        """The instances the outputs reference."""
        return self.sources if self.sources is not None else self.datasets

    def in_source_order(self, mask: np.ndarray) -> np.ndarray:
        """A (slices, rows, columns) array reordered to the source's frame order."""
        if self.frame_numbers is None:
            return mask
        frames = int(self.sources[0].get("NumberOfFrames", len(mask))) if self.sources else 0
        out = np.zeros((max(frames, len(mask)), *mask.shape[1:]), dtype=mask.dtype)
        out[np.asarray(self.frame_numbers) - 1] = mask  # a dropped duplicate frame: empty
        return out

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along (k, j, i)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel (the parallelepiped spanned by the affine's columns) in mL."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def slice_normal(ds: Dataset) -> np.ndarray:
    """The unit normal of an image's plane (row x column direction)."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


# What the volume is built from: each must be readable, and of the multiplicity the standard
# gives it, in every image.
_GEOMETRY = {
    "ImagePositionPatient": 3,
    "ImageOrientationPatient": 6,
    "PixelSpacing": 2,
    "Rows": 1,
    "Columns": 1,
}
_OPTIONAL_NUMBERS = ("NumberOfFrames", "RescaleSlope", "RescaleIntercept", "SliceThickness")


def _read(path: Path | str) -> Dataset:
    try:  # pixel data is read when decoded, one image at a time, not with the headers
        return pydicom.dcmread(path, defer_size="64 KB")
    except Exception as exc:  # the spool holds what was received: a file may still be odd
        raise VolumeError(f"cannot read {Path(path).name}: {type(exc).__name__}") from exc


def _check_geometry(ds: Dataset) -> None:
    """Every attribute the volume is built from, read once through the guarded accessor
    (pydicom converts lazily: an unknown VR or a corrupt value would raise later, anywhere);
    a missing, unreadable or malformed one is a :class:`VolumeError` naming it."""
    uid = read_or_none(ds, "SOPInstanceUID") or "?"
    for keyword, count in _GEOMETRY.items():
        try:
            value = read(ds, keyword)
            values = value if isinstance(value, MultiValue | list | tuple) else [value]
            numbers = [float(v) for v in values] if value not in (None, "") else []
        except (Unreadable, TypeError, ValueError) as exc:
            raise VolumeError(f"instance {uid}: {keyword} is unreadable") from exc
        if not numbers:
            raise VolumeError(f"instance {uid} has no {keyword}")
        if len(numbers) != count or not all(np.isfinite(numbers)):
            raise VolumeError(f"instance {uid}: {keyword} is malformed")
    for keyword in _OPTIONAL_NUMBERS:
        try:
            value = read(ds, keyword)
            if value not in (None, ""):
                float(value)
        except (Unreadable, TypeError, ValueError) as exc:
            raise VolumeError(f"instance {uid}: {keyword} is unreadable") from exc


def _drop_duplicates(datasets: list[Dataset], positions: np.ndarray) -> list[Dataset]:
    """The sorted images less those at the position of the one before them."""
    keep = np.concatenate([[True], np.diff(positions) >= 1e-3])
    return [ds for ds, kept in zip(datasets, keep, strict=True) if kept]


def read_headers(
    paths: Iterable[Path | str], drop_duplicates: bool = False
) -> tuple[list[Dataset], int]:
    """Read and sort the images of one series along the slice normal; returns them and how
    many were left out as duplicates of a position (an error unless ``drop_duplicates``)."""
    datasets: list[Dataset] = [_read(p) for p in paths]
    if not datasets:
        raise VolumeError("the series has no instances")
    for ds in datasets:
        _check_geometry(ds)
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise VolumeError(
                "a series of several multi-frame images (one multi-frame image per series, or "
                "single-frame images, can be processed)"
            )
    normal = slice_normal(datasets[0])
    first_iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    shape = (datasets[0].Rows, datasets[0].Columns)
    for ds in datasets[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), first_iop, atol=1e-3):
            raise VolumeError("the series mixes image orientations")
        if (ds.Rows, ds.Columns) != shape:
            raise VolumeError("the series mixes image sizes")
    datasets.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    positions = np.array(
        [np.dot(normal, np.asarray(d.ImagePositionPatient, float)) for d in datasets]
    )
    if len(positions) > 1 and np.min(np.diff(positions)) < 1e-3:
        if not drop_duplicates:
            raise VolumeError("the series has two images at the same position")
        kept = _drop_duplicates(datasets, positions)
        return kept, len(datasets) - len(kept)
    return datasets, 0


def affine_of(datasets: list[Dataset]) -> np.ndarray:
    """Index -> patient affine; the slice axis follows first-to-last image positions."""
    first = datasets[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, dtype=float)
    if len(datasets) > 1:
        last = np.asarray(datasets[-1].ImagePositionPatient, dtype=float)
        step = (last - origin) / (len(datasets) - 1)
    else:
        step = slice_normal(first) * float(first.get("SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = iop[3:] * row_spacing  # j: down the rows
    affine[:3, 2] = iop[:3] * col_spacing  # i: along a row
    affine[:3, 3] = origin
    return affine


def _functional(ds: Dataset, frame: Dataset, sequence: str) -> Dataset | None:
    """A functional group macro of one frame: per-frame if there, else shared."""
    if sequence in frame:
        return frame[sequence].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0]:
        return shared[0][sequence].value[0]
    return None


_NOT_COPIED = {"PixelData", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"}


def decoded_bytes(ds: Dataset) -> int:
    """What an image's pixel data takes once decoded (and as int16 HU, if larger), from its
    header: known before anything is decoded."""
    try:
        rows, columns = int(read(ds, "Rows", 0) or 0), int(read(ds, "Columns", 0) or 0)
        frames = int(read(ds, "NumberOfFrames", 1) or 1)
        samples = int(read(ds, "SamplesPerPixel", 1) or 1)
        bits = int(read(ds, "BitsAllocated", 16) or 16)
    except (Unreadable, TypeError, ValueError) as exc:
        raise VolumeError("the image size is unreadable") from exc
    pixels = rows * columns * max(frames, 1)
    return pixels * max(samples * ((bits + 7) // 8), 2)


def _check_size(datasets: Sequence[Dataset], limit: int) -> None:
    total = sum(decoded_bytes(ds) for ds in datasets)
    if total > limit:
        raise VolumeError(
            f"the series decodes to {total >> 20} MB, more than inference.max_volume_mb "
            f"({limit >> 20} MB)"
        )


Allocator = Callable[[tuple[int, ...], type], np.ndarray]  # (shape, dtype) -> a new array


def _multiframe_volume(
    ds: Dataset, limit: int, drop_duplicates: bool = False, allocate: Allocator | None = None
) -> Volume:
    """An enhanced (multi-frame) image: each frame's geometry from its functional groups."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    count = int(ds.NumberOfFrames)
    if not frames or len(frames) != count:
        raise VolumeError("a multi-frame image without per-frame functional groups")
    _check_size([ds], limit)
    header = Dataset()
    for elem in ds:
        if elem.keyword not in _NOT_COPIED and elem.tag.group != 0x7FE0:
            header.add(elem)
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    views = []
    rescale = []
    for number, frame in enumerate(frames, start=1):
        position = _functional(ds, frame, "PlanePositionSequence")
        orientation = _functional(ds, frame, "PlaneOrientationSequence")
        measures = _functional(ds, frame, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise VolumeError(f"frame {number} has no plane position, orientation or spacing")
        view = Dataset()
        view.update(header)
        view.ImagePositionPatient = position.ImagePositionPatient
        view.ImageOrientationPatient = orientation.ImageOrientationPatient
        view.PixelSpacing = measures.PixelSpacing
        if "SliceThickness" in measures:
            view.SliceThickness = measures.SliceThickness
        view.ReferencedFrameNumber = number
        views.append(view)
        transform = _functional(ds, frame, "PixelValueTransformationSequence")
        source = transform if transform is not None else ds
        rescale.append(
            (
                float(source.get("RescaleSlope", 1) or 1),
                float(source.get("RescaleIntercept", 0) or 0),
            )
        )
    normal = slice_normal(views[0])
    order = sorted(
        range(count),
        key=lambda n: float(np.dot(normal, np.asarray(views[n].ImagePositionPatient, float))),
    )
    positions = np.array(
        [np.dot(normal, np.asarray(views[n].ImagePositionPatient, float)) for n in order]
    )
    duplicates = 0
    if count > 1 and np.min(np.diff(positions)) < 1e-3:
        if not drop_duplicates:
            raise VolumeError("the multi-frame image has two frames at the same position")
        keep = np.concatenate([[True], np.diff(positions) >= 1e-3])
        duplicates = int((~keep).sum())
        order = [n for n, kept in zip(order, keep, strict=True) if kept]
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise VolumeError(f"cannot decode pixel data: {exc}") from exc
    hu = (allocate or np.empty)((len(order), int(ds.Rows), int(ds.Columns)), np.int16)
    for k, n in enumerate(order):
        slope, intercept = rescale[n]
        values = pixels[n].astype(np.float32) * slope + intercept
        hu[k] = np.clip(np.rint(values), -32768, 32767).astype(np.int16)
    del ds.PixelData  # decoded into hu; the encoders read only the headers (see build_volume)
    sorted_views = [views[n] for n in order]
    return Volume(
        hu=hu,
        affine=affine_of(sorted_views),
        datasets=sorted_views,
        sources=[ds],
        frame_numbers=[n + 1 for n in order],
        duplicates=duplicates,
    )


DEFAULT_MAX_VOLUME_BYTES = 4 << 30


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """The stored values of an uncompressed little-endian 16-bit monochrome image, read
    straight from Pixel Data (pydicom's own decoding costs more than the reading on a CT);
    None for anything else, or where bits above Bits Stored are set (pydicom decides what
    they mean), which pydicom then decodes."""
    meta = getattr(ds, "file_meta", None)
    try:
        if (
            meta is None
            or str(meta.get("TransferSyntaxUID", "")) not in _NATIVE_LE
            or int(ds.get("BitsAllocated", 0)) != 16
            or int(ds.get("SamplesPerPixel", 1)) != 1
            or int(ds.get("NumberOfFrames", 1) or 1) != 1
        ):
            return None
        rows, columns = int(ds.Rows), int(ds.Columns)
        stored = int(ds.get("BitsStored", 16))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        data = ds.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not isinstance(data, bytes) or len(data) < rows * columns * 2:
        return None
    raw = np.frombuffer(data, dtype="<u2", count=rows * columns).reshape(rows, columns)
    if stored < 16 and np.any(raw >> stored):
        return None
    if signed:
        if stored < 16:
            return None  # sign extension of a narrower value: pydicom's
        return raw.view("<i2")
    return raw


def _rescale_into(out: np.ndarray, pixels: np.ndarray, slope: float, intercept: float) -> None:
    """Modality LUT into int16 ``out``: rounded, clipped to int16. An integer intercept with
    slope 1 is added in integers (the same values, none of the float passes)."""
    if slope == 1.0 and intercept == int(intercept) and pixels.dtype.kind in "iu":
        whole = pixels.astype(np.int32)
        whole += int(intercept)
        np.clip(whole, -32768, 32767, out=whole)
        out[...] = whole
        return
    values = pixels.astype(np.float32) * slope + intercept
    out[...] = np.clip(np.rint(values), -32768, 32767).astype(np.int16)


def build_volume(
    paths: Iterable[Path | str],
    max_bytes: int = DEFAULT_MAX_VOLUME_BYTES,
    drop_duplicates: bool = False,
    allocate: Allocator | None = None,
) -> Volume:
    """Read, sort, decode and rescale a series into a :class:`Volume` (single-frame images,
    or one multi-frame image with per-frame functional groups). A series whose headers say
    it decodes to more than ``max_bytes`` is refused before any pixel is decoded (a header
    announcing 65535 x 65535 pixels is 8 GB a slice). Two images at one position are an
    error, unless ``drop_duplicates``: then the first is kept and the volume counts the others.
    ``allocate`` makes the HU array (``np.empty`` by default; the pipeline's puts it in a
    shared-memory region the inference server reads it from)."""
    paths = list(paths)
    if len(paths) == 1:
        single = _read(paths[0])
        try:
            frames = int(read(single, "NumberOfFrames", 1) or 1)
        except (Unreadable, TypeError, ValueError) as exc:
            raise VolumeError("NumberOfFrames is unreadable") from exc
        if frames > 1:
            return _multiframe_volume(single, max_bytes, drop_duplicates, allocate)
    datasets, duplicates = read_headers(paths, drop_duplicates)
    _check_size(datasets, max_bytes)
    shape = (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    hu = (allocate or np.empty)(shape, np.int16)
    for index, ds in enumerate(datasets):
        pixels = _native_pixels(ds)
        if pixels is None:
            try:
                pixels = ds.pixel_array
            except Exception as exc:
                ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
                name = getattr(ts, "name", ts)
                raise VolumeError(f"cannot decode pixel data ({name}): {exc}") from exc
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        _rescale_into(hu[index], pixels, slope, intercept)
        # the headers are kept for the encoders, which reference the images and never read
        # their pixels: the encoded and the decoded pixels (cached by pydicom) would be two
        # more copies of the volume
        del ds.PixelData
    return Volume(hu=hu, affine=affine_of(datasets), datasets=datasets, duplicates=duplicates)
