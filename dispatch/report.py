"""What a TID 1500 measurement report says, read back for the notifications: per measurement
group, the structure (tracking identifier and UID, finding, finding site), its numeric
measurements (concept, derivation, value, unit) and its qualitative evaluations.

Read from the archived SR itself, so a notification says exactly what the PACS receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

# (scheme, value) of the concepts TID 1500 / TID 1501 name their parts with
MEASUREMENT_GROUP = ("DCM", "125007")
TRACKING_IDENTIFIER = ("DCM", "112039")
TRACKING_UID = ("DCM", "112040")
FINDING = ("DCM", "121071")
FINDING_SITE = ("SCT", "363698007")
DERIVATION = ("DCM", "121401")
_STRUCTURAL = {TRACKING_IDENTIFIER, TRACKING_UID, FINDING, FINDING_SITE}


@dataclass(frozen=True)
class Code:
    """A coded concept: value, coding scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str

    def as_json(self) -> dict[str, str]:
        """``{"code", "scheme", "meaning"}``."""
        return {"code": self.value, "scheme": self.scheme, "meaning": self.meaning}


@dataclass(frozen=True)
class Measurement:
    """One numeric measurement of a group (NUM)."""

    name: Code
    value: float
    unit: Code
    derivation: Code | None = None  # Mean, Minimum ... (a modifier of the NUM)


@dataclass
class Group:
    """One measurement group of the report: a structure or finding and what was said of it."""

    tracking_identifier: str | None = None
    tracking_uid: str | None = None
    finding: Code | None = None
    finding_site: Code | None = None
    measurements: list[Measurement] = field(default_factory=list)
    evaluations: list[tuple[Code, Code]] = field(default_factory=list)  # (concept, value)

    def as_json(self) -> dict[str, Any]:
        """The group as plain JSON."""
        return {
            "structure": self.tracking_identifier,
            "tracking_uid": self.tracking_uid,
            "finding": self.finding.as_json() if self.finding else None,
            "finding_site": self.finding_site.as_json() if self.finding_site else None,
            "measurements": [
                {
                    "name": m.name.as_json(),
                    "derivation": m.derivation.as_json() if m.derivation else None,
                    "value": m.value,
                    "unit": m.unit.value,
                }
                for m in self.measurements
            ],
            "evaluations": [
                {"name": name.as_json(), "value": value.as_json()}
                for name, value in self.evaluations
            ],
        }


def _code(item: Dataset, keyword: str) -> Code | None:
    seq = item.get(keyword)
    if not seq:
        return None
    c = seq[0]
    return Code(
        str(c.get("CodeValue", "")),
        str(c.get("CodingSchemeDesignator", "")),
        str(c.get("CodeMeaning", "")),
    )


def _key(code: Code | None) -> tuple[str, str] | None:
    return (code.scheme, code.value) if code is not None else None


def read_groups(path: str) -> list[Group]:
    """The measurement groups of the SR at ``path``, in document order."""
    return groups_of(dcmread(path))


def groups_of(ds: Dataset) -> list[Group]:
    """The measurement groups of an SR data set (at any depth of its content tree)."""
    found: list[Group] = []
    _walk(ds, found)
    return found


def _walk(node: Dataset, found: list[Group]) -> None:
    for item in node.get("ContentSequence", []):
        if item.get("ValueType") == "CONTAINER":
            if _key(_code(item, "ConceptNameCodeSequence")) == MEASUREMENT_GROUP:
                found.append(_group(item))
            else:
                _walk(item, found)


def _group(container: Dataset) -> Group:
    group = Group()
    for item in container.get("ContentSequence", []):
        kind, name = item.get("ValueType"), _code(item, "ConceptNameCodeSequence")
        key = _key(name)
        if kind == "TEXT" and key == TRACKING_IDENTIFIER:
            group.tracking_identifier = str(item.TextValue)
        elif kind == "UIDREF" and key == TRACKING_UID:
            group.tracking_uid = str(item.UID)
        elif kind == "CODE" and key == FINDING:
            group.finding = _code(item, "ConceptCodeSequence")
        elif kind == "CODE" and key == FINDING_SITE:
            group.finding_site = _code(item, "ConceptCodeSequence")
        elif kind == "CODE" and name is not None and key not in _STRUCTURAL:
            value = _code(item, "ConceptCodeSequence")
            if value is not None:
                group.evaluations.append((name, value))
        elif kind == "NUM" and name is not None:
            measured = item.get("MeasuredValueSequence")
            if not measured:
                continue  # no value (a NUM may say why in a qualifier)
            unit = _code(measured[0], "MeasurementUnitsCodeSequence") or Code("1", "UCUM", "")
            derivation = None
            for modifier in item.get("ContentSequence", []):
                if _key(_code(modifier, "ConceptNameCodeSequence")) == DERIVATION:
                    derivation = _code(modifier, "ConceptCodeSequence")
            number = float(measured[0].NumericValue)
            group.measurements.append(Measurement(name, number, unit, derivation))
    return group
