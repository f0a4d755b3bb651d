"""DICOM Segmentation (PS3.3 A.51) with highdicom: one segment per non-empty structure."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from encoders.common import Provenance, SeriesIdentity, Structure


def build_seg(
    *,
    source_images: Sequence[Dataset],
    structures: Sequence[Structure],
    provenance: Provenance,
    series: SeriesIdentity,
) -> hd.seg.Segmentation:
    """A BINARY SEG of ``structures`` (segment n = structures[n-1]) on ``source_images``.

    Structures must be non-empty: an empty result is reported by the SR, not as a segment.
    """
    if not structures:
        raise ValueError("a SEG needs at least one non-empty structure")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=s.label.name,
            segmented_property_category=s.category,
            segmented_property_type=s.type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=s.card.name,
                family=codes.cid7162.ArtificialIntelligence,
                version=s.algorithm_version,
            ),
            tracking_uid=hd.UID(),
            tracking_id=f"{s.card.name}:{s.label.name}",
        )
        for number, s in enumerate(structures, start=1)
    ]
    pixels = np.stack([s.mask.astype(bool) for s in structures], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=list(source_images),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series.series_instance_uid,
        series_number=series.series_number,
        sop_instance_uid=series.sop_instance_uid,
        instance_number=1,
        manufacturer=provenance.manufacturer,
        manufacturer_model_name=provenance.model_name,
        software_versions=provenance.software_version,
        device_serial_number=provenance.device_serial_number,
        content_label="SEGMENTATION",
        content_description=series.series_description[:64],
        omit_empty_frames=True,
    )
    seg.SeriesDescription = series.series_description
    if provenance.institution_name:
        seg.InstitutionName = provenance.institution_name
    return seg
