"""From model cards to what the encoders take: a segment spec per label, a structure per mask.

The one place that knows both a model card and the encoders' vocabulary; the encoders never see
a card.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept

from airouter.core.templates import Template
from airouter.core.vocab import OutputKind
from encoders.common import Classification, SegmentSpec, Structure
from inference.cards import CodedConcept as CardConcept
from inference.cards import Label, ModelCard, Task
from inference.runner import ModelOutput


def _concept(c: CardConcept) -> CodedConcept:
    return CodedConcept(value=c.value, scheme_designator=c.scheme, meaning=c.meaning)


def segment_spec(card: ModelCard, label: Label, tracking_uid: str = "") -> SegmentSpec:
    """How the objects describe ``label`` of ``card``; the algorithm version carries the
    first 12 hex digits of the card's checksum, so a changed card shows in every object."""
    return SegmentSpec(
        name=label.name,
        category=_concept(label.category),
        type=_concept(label.type),
        color=label.color,
        rt_roi_type=label.rt_roi_type,
        algorithm_name=card.name,
        algorithm_version=f"{card.version} card:{card.checksum[:12]}",
        tracking_id=f"{card.name}:{label.name}",
        tracking_uid=tracking_uid,
    )


def structures_of(
    card: ModelCard, output: ModelOutput, hu: np.ndarray, voxel_ml: float
) -> list[Structure]:
    """One structure per label of a segmentation model's output: its mask, and for a found
    one its volume, attenuation (mean, min, max in the modality's units) and probability."""
    labels, bits = output.labels, output.label_bits
    if labels is None and bits is None:
        return []
    maps = output.probabilities if OutputKind.PROBABILITY_MAP in card.outputs else {}
    # labels of 0 and 1 only (ct-body) are label 1's mask already: a view, not a copy
    binary = (
        labels is not None
        and labels.dtype == np.uint8
        and labels.size > 0
        and int(labels.max()) <= 1
    )
    structures = []
    for label in card.labels:
        if bits is not None:
            mask = unpacked_mask(bits[label.value - 1], hu.shape)
        else:
            assert labels is not None
            mask = (
                labels.view(bool) if binary and label.value == 1 else mask_of(labels, label.value)
            )
        intensities = _intensities(hu, mask)
        found = intensities is not None
        structures.append(
            Structure(
                # one tracking UID per structure and job: its SEG segment, SR groups and
                # RTSTRUCT ROI all carry it
                spec=segment_spec(card, label, tracking_uid=hd.UID()),
                mask=mask,
                volume_ml=float(np.count_nonzero(mask)) * voxel_ml if found else None,
                intensities_hu=intensities,
                probability=maps.get(label.value),
            )
        )
    return structures


def mask_of(labels: np.ndarray, value: int, slab: int = 16) -> np.ndarray:
    """The mask of ``value`` in ``labels``, written only on the slabs that hold it: the rest
    of it is memory never touched (numpy's zeros are the kernel's zero pages until written),
    so a structure costs memory for the slices it spans, and one not found none at all
    (ct-lungs on a 1,000-slice head CT: two masks of 262 MB each before)."""
    mask = np.zeros(labels.shape, dtype=bool)
    for k in range(0, len(labels), slab):
        part = labels[k : k + slab] == value
        if part.any():
            mask[k : k + slab] = part
    return mask


def unpacked_mask(bits: np.ndarray, shape: tuple[int, ...], slab: int = 16) -> np.ndarray:
    """The mask of ``shape`` whose rows ``bits`` holds packed (numpy ``packbits``), unpacked
    only on the slabs that have a bit set: like :func:`mask_of`, a structure costs memory for
    the slices it spans."""
    if bits.shape != (*shape[:2], -(-shape[2] // 8)):
        raise ValueError(f"bits of {bits.shape} for a mask of {shape}")
    mask = np.zeros(shape, dtype=bool)
    for k in range(0, shape[0], slab):
        part = bits[k : k + slab]
        if part.any():
            mask[k : k + slab] = np.unpackbits(part, axis=-1, count=shape[2]).view(bool)
    return mask


def _intensities(hu: np.ndarray, mask: np.ndarray) -> tuple[float, float, float] | None:
    """Mean, min and max of ``hu`` in ``mask`` (None for an empty mask), 16 slices at a time:
    never a copy of every value in a large structure."""
    count, total, low, high = 0, 0.0, np.inf, -np.inf
    for k in range(0, len(mask), 16):
        values = hu[k : k + 16][mask[k : k + 16]]
        if values.size:
            count += values.size
            total += float(values.sum(dtype=np.float64))
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    return None if count == 0 else (total / count, low, high)


def looked_for_structures(card: ModelCard) -> list[Structure]:
    """Every label of a segmentation model, as not found (an empty mask): what a report on a
    series the model never ran on says it would have looked for."""
    if card.task is not Task.SEGMENTATION:
        return []
    empty = np.zeros((0, 0, 0), dtype=bool)
    return [
        Structure(spec=segment_spec(card, label, tracking_uid=hd.UID()), mask=empty)
        for label in card.labels
    ]


def classifications_of(card: ModelCard, output: ModelOutput) -> list[Classification]:
    """One classification per label a classification model scored."""
    return [
        Classification(
            segment_spec(card, label),
            output.scores[label.name],
            card.postprocessing.threshold,
        )
        for label in card.labels
        if label.name in output.scores
    ]


@dataclass
class Templated:
    """Structures as a site template names them, and what the template did (for the job)."""

    structures: list[Structure]
    left_out: list[str] = field(default_factory=list)  # not listed: not sent
    missing: list[str] = field(default_factory=list)  # listed, from no model of this job


def out_of_view(
    cards: Mapping[str, ModelCard], structures: Sequence[Structure], body_part: str
) -> dict[str, str]:
    """The structures not found on a series of ``body_part`` (its BodyPartExamined) that their
    model cannot call absent there (its card's ``body_parts`` leave the region out): tracking
    identifier -> why they are not assessable."""
    reasons = {}
    for s in structures:
        card = cards.get(s.spec.algorithm_name)
        if s.found or card is None or card.covers(body_part):
            continue
        reasons[s.spec.tracking_id] = (
            f"out of view: Body Part Examined {body_part.strip().upper()} is not a region "
            f"in which {card.name} can tell absence"
        )
    return reasons


def apply_template(template: Template | None, structures: list[Structure]) -> Templated:
    """Rename, recolour and retype ``structures`` as ``template`` says (ROI name, segment
    label and the SR's tracking identifier are the template's name); those it does not list
    are left out when it sends only what it lists. Without a template, unchanged."""
    if template is None:
        return Templated(list(structures))
    result = Templated([])
    for s in structures:
        entry = template.entry(s.spec.algorithm_name, s.spec.tracking_id.split(":", 1)[1])
        if entry is None:
            if template.only_listed:
                result.left_out.append(s.spec.tracking_id)
            else:
                result.structures.append(s)
            continue
        spec = replace(
            s.spec,
            name=entry.name,
            color=entry.color or s.spec.color,
            rt_roi_type=entry.type or s.spec.rt_roi_type,
            observation_label=entry.observation_label or "",
            tracking_id=entry.name,
        )
        result.structures.append(replace(s, spec=spec))
    produced = {s.spec.tracking_id for s in structures}
    result.missing = [
        f"{e.model}:{e.label}"
        for e in template.structures
        if f"{e.model}:{e.label}" not in produced
    ]
    return result
