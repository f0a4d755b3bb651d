"""Test helpers for the objects the node writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from airouter.jobs.specs import segment_spec
from encoders.common import Provenance, SeriesIdentity, Structure
from encoders.rtstruct import build_rtstruct
from encoders.seg import build_seg
from encoders.sr import build_measurement_report
from inference.cards import Label, ModelCard


def structure(card: ModelCard, label: Label, mask: np.ndarray, **measured: Any) -> Structure:
    """A structure of ``label`` of ``card``, described as the pipeline describes it."""
    return Structure(segment_spec(card, label), mask, **measured)


def build_all(
    images: Sequence[Dataset], structures: Sequence[Structure], provenance: Provenance
) -> tuple[Dataset, Dataset, Dataset]:
    """SEG, SR (volume 1 mL per structure) and RTSTRUCT, as the pipeline builds them."""
    seg = build_seg(
        source_images=images,
        structures=structures,
        provenance=provenance,
        series=SeriesIdentity(hd.UID(), 901, "AI segmentation", hd.UID()),
    )
    sr = build_measurement_report(
        source_images=images,
        seg=seg,
        structures=[replace(s, volume_ml=1.0) for s in structures],
        provenance=provenance,
        device_uid=hd.UID(),
        series=SeriesIdentity(hd.UID(), 902, "AI measurements", hd.UID()),
    )
    rt = build_rtstruct(
        source_images=images,
        structures=structures,
        provenance=provenance,
        series=SeriesIdentity(hd.UID(), 903, "AI structures", hd.UID()),
    )
    return seg, sr, rt


def dataset_bytes(data: bytes) -> bytes:
    """The encoded data set of a DICOM file: everything after the file meta information."""
    fp = pydicom.filebase.DicomBytesIO(data)
    assert fp.read(132)[128:] == b"DICM"
    pydicom.filereader._read_file_meta_info(fp)
    return bytes(fp.read())
