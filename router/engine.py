"""Rule evaluation: a pure function from a study's series and the rules to decisions."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from router.rules import Condition, Orientation, Rule


@dataclass(frozen=True)
class SeriesInfo:
    """What the router knows of one series: denormalised tags and the instance count."""

    series_uid: str
    tags: Mapping[str, Any] = field(default_factory=dict)
    instance_count: int = 0


@dataclass(frozen=True)
class Decision:
    """Run ``rule`` on ``series_uid``."""

    rule: Rule
    series_uid: str


def condition_holds(cond: Condition, value: Any) -> bool:
    """Whether a tag value satisfies a condition; a missing tag satisfies nothing."""
    if value is None or value == "":
        return False
    values = value if isinstance(value, list | tuple) else [value]
    if cond.equals is not None:
        return any(_same(v, cond.equals) for v in values)
    if cond.one_of is not None:
        return any(_same(v, option) for v in values for option in cond.one_of)
    if cond.regex is not None:
        pattern = re.compile(cond.regex)
        return any(pattern.search(str(v)) is not None for v in values)
    return False


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        try:
            return float(value) == float(expected)
        except (TypeError, ValueError):
            return False
    return str(value).strip() == str(expected)


def orientation_of(iop: Sequence[float] | None) -> Orientation | None:
    """Axial / coronal / sagittal from ImageOrientationPatient (the slice normal's main axis)."""
    if not iop or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.8:  # more than ~37 degrees off every axis
        return Orientation.OBLIQUE
    return (Orientation.SAGITTAL, Orientation.CORONAL, Orientation.AXIAL)[axis]


def series_matches(rule: Rule, series: SeriesInfo) -> bool:
    """All of the rule's conditions hold for the series, and its selection criteria too."""
    if not all(condition_holds(c, series.tags.get(kw)) for kw, c in rule.match.items()):
        return False
    sel = rule.select
    if series.instance_count < sel.min_instances:
        return False
    image_type = series.tags.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    if any(t in image_type for t in sel.exclude_image_types):
        return False
    return sel.orientation is None or (
        orientation_of(series.tags.get("ImageOrientationPatient")) == sel.orientation
    )


def required_series_present(rule: Rule, series: Sequence[SeriesInfo]) -> bool:
    """Whether the rule states required series and the study holds all of them."""
    if not rule.enabled or not rule.require_series:
        return False
    return all(
        any(
            s.instance_count >= req.min_instances
            and all(condition_holds(c, s.tags.get(kw)) for kw, c in req.match.items())
            for s in series
        )
        for req in rule.require_series
    )


def decide(series: Sequence[SeriesInfo], rules: Sequence[Rule]) -> list[Decision]:
    """For each enabled rule, the series it would process (the largest matching one)."""
    decisions = []
    for rule in rules:
        if not rule.enabled:
            continue
        candidates = [s for s in series if series_matches(rule, s)]
        if candidates:
            best = max(candidates, key=lambda s: (s.instance_count, s.series_uid))
            decisions.append(Decision(rule, best.series_uid))
    return decisions
