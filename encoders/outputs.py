"""The encoders' one entry point: the output set a job asks for, from its structures.

:func:`encode_outputs` writes, as the request asks, a SEG (BINARY or LABELMAP) of the structures
found, a TID 1500 SR of their measurements (and of what was looked for and not found, and of
classifications), an RTSTRUCT of their contours and a FRACTIONAL SEG of their probabilities.
Provenance and the series identity of every object come from the encoder settings, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from airouter.core.settings import EncoderSettings
from airouter.core.vocab import OutputKind, SegType
from encoders.common import (
    PER_IMAGE,
    Classification,
    PriorStudy,
    Provenance,
    SegmentSpec,
    SeriesIdentity,
    Structure,
    drop_unreadable,
    ensure_type2,
    fit_lengths,
    normalise_values,
)
from encoders.rtstruct import build_rtstruct
from encoders.seg import build_probability_seg, build_seg
from encoders.sr import InputQuality, build_measurement_report


def _same_order(array: np.ndarray) -> np.ndarray:
    return array


@dataclass(frozen=True)
class SourceSeries:
    """The images the outputs describe and reference.

    ``slices`` holds one header per slice of the structures' masks, in their order, each with
    its own geometry (the RTSTRUCT places contours with them). ``instances`` are what the SEG
    and the SR reference: the same headers for a single-frame series, the multi-frame image
    itself otherwise, whose frame order ``to_instance_order`` maps a mask to.
    """

    slices: Sequence[Dataset]
    instances: Sequence[Dataset] | None = None
    to_instance_order: Callable[[np.ndarray], np.ndarray] = _same_order

    def in_instance_order(self, structure: Structure) -> Structure:
        """``structure`` with its mask in the order of the referenced instances (the same
        structure, and what it has computed of its mask, for a single-frame series)."""
        if self.to_instance_order is _same_order:
            return structure
        return replace(structure, mask=self.to_instance_order(structure.mask))

    @property
    def referenced(self) -> Sequence[Dataset]:
        """The instances the SEG and the SR reference."""
        return self.instances if self.instances is not None else self.slices


@dataclass(frozen=True)
class OutputRequest:
    """What a job asks for: which objects, which kind of SEG, which version of its results."""

    kinds: frozenset[OutputKind]
    seg_type: SegType = SegType.BINARY
    version: int = 1  # 2, 3 ...: amended results say so in their series description
    shadow: bool = False  # a shadow run's outputs say so in their series description
    # research results: "NOT FOR CLINICAL USE" leads every series description
    research: bool = False
    structure_set_label: str = "AI"  # the RTSTRUCT's Structure Set Label (SH)
    structure_set_name: str | None = None  # its Name (LO); the series description if None
    # structures looked for and not found that the RTSTRUCT lists as ROIs without contours
    placeholders: bool = False
    # input quality checks that failed (the SR reports them; structures then not found are
    # "not assessable", with the reason, rather than "Absent")
    quality: InputQuality | None = None
    # structures not found where their model cannot tell absence (outside the region it
    # reads): tracking identifier -> the reason; "not assessable" rather than "Absent"
    out_of_view: Mapping[str, str] = field(default_factory=dict)
    # the patient's previous comparable study, measured by the same models (the SR compares)
    prior: PriorStudy | None = None


@dataclass
class EncodedOutputs:
    """The objects written, in the order they go out, and notes for the job's audit trail
    (event kind, detail: no PHI)."""

    objects: list[tuple[OutputKind, Dataset]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)


def provenance_of(settings: EncoderSettings) -> Provenance:
    """General Equipment of the objects, from the configured device."""
    dev = settings.device
    return Provenance(
        manufacturer=dev.manufacturer,
        model_name=dev.model_name,
        software_version=dev.software_version,
        device_serial_number=dev.device_serial_number,
        institution_name=dev.institution_name,
    )


SHADOW_PREFIX = "SHADOW "  # the series description of a shadow run's outputs starts so
RESEARCH_PREFIX = "NOT FOR CLINICAL USE "  # ... and a research rule's


def _identity(
    settings: EncoderSettings, kind: OutputKind, request: OutputRequest
) -> SeriesIdentity:
    """A new series per output kind and job; amended results say which version they are,
    a shadow run's that they are one (whatever the description's length, the prefix stays)."""
    spec = settings.output_series[kind]
    version = request.version
    description = spec.description if version == 1 else f"{spec.description} v{version}"
    if request.research:
        description = RESEARCH_PREFIX + description
    if request.shadow:
        description = SHADOW_PREFIX + description
    return SeriesIdentity(hd.UID(), spec.number, description[:64], hd.UID())


def _prepare(source: SourceSeries) -> list[tuple[str, str]]:
    """Make the in-memory source headers safe to copy: every element decoded now (the encoders
    then only read them) and the unreadable ones removed,
    malformed dates and times repaired or emptied, over-long text shortened (identifiers kept
    exact), type 2 attributes the headers lack added empty. Returns the job notes that say
    which attributes changed (the keywords only: the values may identify the patient)."""
    # what the objects copy comes from the first image (and a multi-frame image itself): those
    # are decoded in full, repaired and shortened; of the other slices only what the encoders
    # read of each image is decoded (all of a 500-slice CT's headers took 1.5 s)
    copied = [source.slices[0], *(source.instances or ())]
    dropped = sorted(
        {*drop_unreadable(copied), *drop_unreadable(source.slices[1:], only=PER_IMAGE)}
    )
    repaired = normalise_values(copied)
    shortened, overlong = fit_lengths(copied)
    added = ensure_type2(source.slices)
    if source.instances is not None:
        added = sorted({*added, *ensure_type2(source.instances)})
    notes = [
        ("source_values_unreadable", dropped),
        ("source_values_repaired", repaired),
        ("source_values_shortened", shortened),
        ("source_identifiers_overlong", overlong),
        ("type2_attributes_added", added),
    ]
    return [(key, ", ".join(names)) for key, names in notes if names]


def encode_outputs(
    *,
    request: OutputRequest,
    source: SourceSeries,
    structures: Sequence[Structure],
    classifications: Sequence[Classification] = (),
    settings: EncoderSettings,
    device_uid: str,
) -> EncodedOutputs:
    """Build the objects ``request`` asks for.

    ``structures`` are every structure the models looked for, found or not; each found one
    carries its volume and attenuation for the SR (and its probability map, if the model
    gives one). With nothing found there is no SEG or RTSTRUCT; the SR, if asked for, says
    what was looked for.
    """
    result = EncodedOutputs()
    result.notes.extend(_prepare(source))
    provenance = provenance_of(settings)
    found = [s for s in structures if s.found]
    absent = [s.spec for s in structures if not s.found]
    kinds = request.kinds
    placeholders = [s for s in structures if not s.found] if request.placeholders else []
    dropped: dict[str, int] = {}
    seg = None
    if found:
        seg = build_seg(
            source_images=source.referenced,
            structures=[source.in_instance_order(s) for s in found],
            provenance=provenance,
            series=_identity(settings, OutputKind.SEG, request),
            seg_type=request.seg_type,
        )
        if OutputKind.SEG in kinds or OutputKind.SR in kinds:
            result.objects.append((OutputKind.SEG, seg))
    if OutputKind.SR in kinds:
        sr = build_measurement_report(
            source_images=source.referenced,
            seg=seg,
            structures=found,
            absent=absent,
            classifications=classifications,
            provenance=provenance,
            device_uid=device_uid,
            series=_identity(settings, OutputKind.SR, request),
            # single-frame images: each structure also drawn on one of them (TID 1410)
            planar_slices=source.slices if source.instances is None else None,
            # the Image Library: a multi-frame image once, described by its first frame's view
            library_images=source.slices if source.instances is None else source.slices[:1],
            quality=request.quality,
            not_assessable=_not_assessable(request.quality, absent, request.out_of_view),
            prior=request.prior,
        )
        result.objects.append((OutputKind.SR, sr))
    if found and OutputKind.RTSTRUCT in kinds:
        rtstruct = _rtstruct(source, found, placeholders, dropped, provenance, settings, request)
        result.objects.append((OutputKind.RTSTRUCT, rtstruct))
        if dropped:
            result.notes.append(
                (
                    "contours_dropped",
                    "; ".join(
                        f"{name}: {n} contours of fewer than 3 points or no area"
                        for name, n in dropped.items()
                    ),
                )
            )
        if placeholders:
            result.notes.append(
                ("rtstruct_placeholders", ", ".join(s.spec.name for s in placeholders))
            )
    if OutputKind.PROBABILITY_MAP in kinds:
        _probability_map(result, source, structures, provenance, settings, request)
    return result


def _not_assessable(
    quality: InputQuality | None,
    absent: Sequence[SegmentSpec],
    out_of_view: Mapping[str, str],
) -> dict[str, str]:
    """With failed input quality checks, a structure not found may be missed for it; outside
    the region its model reads, it is out of view: not assessable, for the reasons found,
    instead of a definite "Absent"."""
    quality_reason = (
        "input quality: " + "; ".join(quality.findings)
        if quality is not None and quality.findings
        else None
    )
    reasons = {}
    for spec in absent:
        found = [r for r in (quality_reason, out_of_view.get(spec.tracking_id)) if r]
        if found:
            reasons[spec.tracking_id] = "; ".join(found)
    return reasons


def _rtstruct(
    source: SourceSeries,
    found: list[Structure],
    placeholders: list[Structure],
    dropped: dict[str, int],
    provenance: Provenance,
    settings: EncoderSettings,
    request: OutputRequest,
) -> Dataset:
    # built after the SEG and SR, in this thread: a second thread for it made the three
    # slower once their encoding was mostly Python (bench/encode.py)
    return build_rtstruct(
        source_images=source.slices,
        structures=found,
        provenance=provenance,
        series=_identity(settings, OutputKind.RTSTRUCT, request),
        label=request.structure_set_label,
        name=(
            RESEARCH_PREFIX + request.structure_set_name
            if request.research and request.structure_set_name
            else request.structure_set_name
        ),
        description=(
            "NOT FOR CLINICAL USE: results of a research rule" if request.research else None
        ),
        placeholders=placeholders,
        dropped=dropped,
    )


def _probability_map(
    result: EncodedOutputs,
    source: SourceSeries,
    structures: Sequence[Structure],
    provenance: Provenance,
    settings: EncoderSettings,
    request: OutputRequest,
) -> None:
    """Every structure with a probability map, found or not: a low map explains an absence."""
    mapped = [s for s in structures if s.probability is not None]
    if not mapped:
        result.notes.append(
            ("probability_map_unavailable", "no model of this job gives a probability map")
        )
        return
    fractional = build_probability_seg(
        source_images=source.referenced,
        structures=[
            replace(
                s,
                mask=source.to_instance_order(s.mask),
                probability=source.to_instance_order(s.probability),
            )
            for s in mapped
            if s.probability is not None
        ],
        provenance=provenance,
        series=_identity(settings, OutputKind.PROBABILITY_MAP, request),
    )
    result.objects.append((OutputKind.PROBABILITY_MAP, fractional))
