"""TID 1500 Measurement Report (Comprehensive 3D SR) with highdicom: volumes per structure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from encoders.common import Provenance, SeriesIdentity, Structure

MILLILITER = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")


def _absent(s: Structure) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the model looked for this structure and found none."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{s.card.name}:{s.label.name}"
        ),
        finding_type=s.type,
        algorithm_id=hd.sr.AlgorithmIdentification(name=s.card.name, version=s.algorithm_version),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=s.type, value=codes.SCT.Absent)],
    )


def _classified(s: Structure, score: float, threshold: float) -> Any:
    """TID 1501 for a classification output: the finding Present or Absent, with the model's
    score (a probability, unit "1")."""
    present = score >= threshold
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{s.card.name}:{s.label.name}"
        ),
        finding_type=s.type,
        algorithm_id=hd.sr.AlgorithmIdentification(name=s.card.name, version=s.algorithm_version),
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=round(float(score), 4),
                unit=codes.UCUM.NoUnits,
                algorithm_id=hd.sr.AlgorithmIdentification(
                    name=s.card.name, version=s.algorithm_version
                ),
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=s.type, value=codes.SCT.Present if present else codes.SCT.Absent
            )
        ],
    )


def _attenuation(stats: tuple[float, float, float] | None) -> list[hd.sr.Measurement]:
    """Mean, minimum and maximum attenuation (HU) as TID 300 measurements with derivations."""
    if stats is None:
        return []
    return [
        hd.sr.Measurement(
            name=codes.DCM.AttenuationCoefficient,
            value=round(float(value), 2),
            unit=codes.UCUM.HounsfieldUnit,
            derivation=derivation,
        )
        for derivation, value in zip(
            (codes.SCT.Mean, codes.SCT.Minimum, codes.SCT.Maximum), stats, strict=True
        )
    ]


def build_measurement_report(
    *,
    source_images: Sequence[Dataset],
    seg: Dataset | None,
    structures: Sequence[Structure],
    volumes_ml: Sequence[float],
    provenance: Provenance,
    intensities_hu: Sequence[tuple[float, float, float]] | None = None,
    absent: Sequence[Structure] = (),
    classifications: Sequence[tuple[Structure, float, float]] = (),
    device_uid: str,
    series: SeriesIdentity,
) -> hd.sr.Comprehensive3DSR:
    """One TID 1411 volumetric group per structure found, referencing its segment in ``seg``,
    and one TID 1501 group per structure the model looked for and did not find ("Absent");
    ``classifications`` (structure, score, threshold) of classification models become TID 1501
    groups with the finding Present or Absent and the score.

    ``structures[n]`` is segment ``n + 1`` of ``seg``; ``volumes_ml[n]`` its volume;
    ``intensities_hu[n]``, when given, its (mean, min, max) attenuation in HU. With nothing
    found there is no SEG (``seg`` None, ``structures`` empty): the report says so.
    """
    if seg is None and structures:
        raise ValueError("structures that were found need the SEG that holds them")
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=provenance.model_name,
            manufacturer_name=provenance.manufacturer,
            model_name=provenance.model_name,
            serial_number=provenance.device_serial_number,
        ),
    )
    source_series = hd.sr.SourceSeriesForSegmentation(source_images[0].SeriesInstanceUID)
    seg_class, seg_instance = (seg.SOPClassUID, seg.SOPInstanceUID) if seg is not None else ("", "")
    groups: list[Any] = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(), identifier=f"{s.card.name}:{s.label.name}"
            ),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg_class,
                sop_instance_uid=seg_instance,
                segment_number=number,
                source_series=source_series,
            ),
            finding_type=s.type,
            algorithm_id=hd.sr.AlgorithmIdentification(
                name=s.card.name, version=s.algorithm_version
            ),
            measurements=[
                hd.sr.Measurement(
                    name=codes.SCT.Volume, value=round(float(volume), 3), unit=MILLILITER
                ),
                *_attenuation(intensities_hu[number - 1] if intensities_hu else None),
            ],
        )
        for number, (s, volume) in enumerate(zip(structures, volumes_ml, strict=True), start=1)
    ]
    groups += [_absent(s) for s in absent]
    groups += [_classified(s, score, threshold) for s, score, threshold in classifications]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_images, *([seg] if seg is not None else [])],
        content=report,
        series_instance_uid=series.series_instance_uid,
        series_number=series.series_number,
        sop_instance_uid=series.sop_instance_uid,
        instance_number=1,
        manufacturer=provenance.manufacturer,
        institution_name=provenance.institution_name,
        is_complete=True,
    )
    sr.SeriesDescription = series.series_description
    sr.ManufacturerModelName = provenance.model_name
    sr.SoftwareVersions = provenance.software_version
    sr.DeviceSerialNumber = provenance.device_serial_number
    return sr
