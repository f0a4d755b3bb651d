"""What every encoder needs: provenance, the structures to encode, series identity."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from highdicom.sr import CodedConcept

from inference.cards import Label, ModelCard


@dataclass(frozen=True)
class Provenance:
    """General Equipment of the objects we write; from configuration, never literals."""

    manufacturer: str
    model_name: str
    software_version: str
    device_serial_number: str
    institution_name: str | None = None


@dataclass(frozen=True)
class Structure:
    """One segmented structure: a label of a model card and its mask on the source grid."""

    label: Label
    card: ModelCard
    mask: np.ndarray  # bool, (slices, rows, columns) in the order of the source images

    @property
    def category(self) -> CodedConcept:
        c = self.label.category
        return CodedConcept(value=c.value, scheme_designator=c.scheme, meaning=c.meaning)

    @property
    def type(self) -> CodedConcept:
        c = self.label.type
        return CodedConcept(value=c.value, scheme_designator=c.scheme, meaning=c.meaning)

    @property
    def algorithm_version(self) -> str:
        """Model version and the first 12 hex digits of its card's checksum."""
        return f"{self.card.version} card:{self.card.checksum[:12]}"


@dataclass(frozen=True)
class SeriesIdentity:
    series_instance_uid: str
    series_number: int
    series_description: str
    sop_instance_uid: str
