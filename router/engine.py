"""Rule evaluation: a pure function from a study (its series and where it came from) and the
rules to decisions, with the reason each rule did or did not match."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from airouter.core.phi import is_identifying
from airouter.core.vocab import Action
from router.rules import Condition, Orientation, Preference, Rule, When


@dataclass(frozen=True)
class SeriesInfo:
    """What the router knows of one series: denormalised tags and the instance count."""

    series_uid: str
    tags: Mapping[str, Any] = field(default_factory=dict)
    instance_count: int = 0

    @property
    def image_count(self) -> int:
        """Images: the instances, or the frames of a multi-frame (enhanced) image."""
        frames = _number(self.tags.get("NumberOfFrames"), None)
        return max(self.instance_count, int(frames) if frames else 0)


@dataclass(frozen=True)
class StudyContext:
    """A study as the rules see it."""

    series: Sequence[SeriesInfo]
    calling_ae: str | None = None
    called_ae: str | None = None
    source_address: str | None = None


@dataclass(frozen=True)
class Decision:
    """Apply ``rule`` to ``series_uid`` (None for a rule that discards the study)."""

    rule: Rule
    series_uid: str | None


@dataclass(frozen=True)
class Verdict:
    """Whether a rule matched a study, and why (the first failing condition otherwise)."""

    rule: Rule
    matched: bool
    reason: str
    series_uid: str | None = None


# -- values ------------------------------------------------------------------------------
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _number(value: Any, keyword: str | None) -> float | None:
    if isinstance(value, float):
        return value
    text = str(value).strip()
    if keyword == "PatientAge":
        m = _AGE.match(text)
        return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2)] if m else None
    try:
        return float(text)
    except ValueError:
        return None


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple):
        return [v for v in value if v not in (None, "")]
    return [value]


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        number = _number(value, None)
        return number is not None and number == float(expected)
    return str(value).strip() == str(expected)


def condition_holds(cond: Condition, value: Any, keyword: str | None = None) -> bool:
    """Whether a value satisfies a condition; a missing value satisfies only ``present: false``."""
    values = _values(value)
    if cond.present is not None:
        return bool(values) == cond.present
    if not values:
        return False
    if cond.equals is not None:
        return any(_same(v, cond.equals) for v in values)
    if cond.one_of is not None:
        return any(_same(v, option) for v in values for option in cond.one_of)
    if cond.regex is not None:
        pattern = re.compile(cond.regex)
        return any(pattern.search(str(v)) is not None for v in values)
    if cond.contains is not None:
        return any(str(v).strip() == cond.contains for v in values)
    if cond.range is not None:
        numbers = [_number(v, keyword) for v in values]
        low, high = cond.range.min, cond.range.max
        return all(
            n is not None and (low is None or n >= low) and (high is None or n <= high)
            for n in numbers
        )
    return False


def age_from_dates(tags: Mapping[str, Any]) -> float | None:
    """Age in years at the study date, from PatientBirthDate and StudyDate (YYYYMMDD)."""
    try:
        birth = datetime.strptime(str(tags.get("PatientBirthDate", ""))[:8], "%Y%m%d")
        study = datetime.strptime(str(tags.get("StudyDate", ""))[:8], "%Y%m%d")
    except ValueError:
        return None
    return (study - birth).days / 365.25 if study >= birth else None


def _failing(
    conditions: Mapping[str, Condition], tags: Mapping[str, Any], show: bool = False
) -> str | None:
    """The first condition that does not hold, with the value seen (None: all hold); an
    identifying attribute's value (PatientAge, PatientSex ...) is withheld unless ``show``."""
    for keyword, cond in conditions.items():
        value = tags.get(keyword)
        if keyword == "PatientAge" and not _values(value):
            value = age_from_dates(tags)  # PatientAge is type 3: fall back to the dates
        if not condition_holds(cond, value, keyword):
            if not _values(value):
                seen = "missing"
            elif is_identifying(keyword) and not show:
                seen = "withheld"
            else:
                seen = repr(value)
            return f"{keyword} {cond.describe()} (seen: {seen})"
    return None


# -- geometry ----------------------------------------------------------------------------
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


# -- study level ---------------------------------------------------------------------------
def _study_tags(ctx: StudyContext) -> Mapping[str, Any]:
    """Study-level attributes: the same in every series; taken from the largest one."""
    if not ctx.series:
        return {}
    return max(ctx.series, key=lambda s: s.instance_count).tags


def when_failure(node: When, ctx: StudyContext, show: bool = False) -> str | None:
    """Why a condition tree does not hold for a study (None when it holds)."""
    if node.all_of is not None:
        for child in node.all_of:
            reason = when_failure(child, ctx, show)
            if reason:
                return reason
        return None
    if node.any_of is not None:
        reasons = [when_failure(child, ctx, show) for child in node.any_of]
        return (
            None
            if any(r is None for r in reasons)
            else "none of: " + "; ".join(r for r in reasons if r)
        )
    if node.not_ is not None:
        return "the negated condition holds" if when_failure(node.not_, ctx) is None else None
    if node.any_series is not None:
        conds = node.any_series.conditions
        failures = [_failing(conds, s.tags, show) for s in ctx.series]
        if any(f is None for f in failures):
            return None
        first = next((f for f in failures if f), "a series at all")
        return f"no series satisfies it (first: {first})"
    if node.all_series is not None:
        for s in ctx.series:
            failure = _failing(node.all_series.conditions, s.tags, show)
            if failure:
                return f"series {s.series_uid}: {failure}"
        return None
    for name, cond in (
        ("calling_ae", node.calling_ae),
        ("called_ae", node.called_ae),
        ("source_address", node.source_address),
    ):
        if cond is not None:
            value = getattr(ctx, name)
            return (
                None
                if condition_holds(cond, value)
                else f"{name} {cond.describe()} (seen: {value!r})"
            )
    return _failing(node.keywords or {}, _study_tags(ctx), show)


# -- series level ----------------------------------------------------------------------------
def series_failure(rule: Rule, series: SeriesInfo, show: bool = False) -> str | None:
    """Why the rule would not process this series (None when it would)."""
    failure = _failing(rule.match, series.tags, show)
    if failure:
        return failure
    sel = rule.select
    if series.image_count < sel.min_instances:
        return f"{series.image_count} images, fewer than {sel.min_instances}"
    image_type = [str(t) for t in _values(series.tags.get("ImageType"))]
    excluded = [t for t in sel.exclude_image_types if t in image_type]
    if excluded:
        return f"ImageType contains {excluded[0]}"
    missing = [t for t in sel.image_types if t not in image_type]
    if missing:
        return f"ImageType lacks {missing[0]}"
    orientation = orientation_of(series.tags.get("ImageOrientationPatient"))
    if sel.orientation is not None and orientation != sel.orientation:
        return f"orientation {orientation} is not {sel.orientation.value}"
    if sel.slice_thickness_mm is not None and not condition_holds(
        Condition(range=sel.slice_thickness_mm), series.tags.get("SliceThickness")
    ):
        return f"SliceThickness {series.tags.get('SliceThickness')!r} outside the range"
    if (
        sel.contrast is not None
        and bool(_values(series.tags.get("ContrastBolusAgent"))) != sel.contrast
    ):
        return "contrast" if not sel.contrast else "no contrast agent"
    return None


def _preference_key(prefs: Sequence[Preference], s: SeriesInfo) -> tuple[float, ...]:
    thickness = _number(s.tags.get("SliceThickness"), None) or 0.0
    keys = {
        Preference.MOST_INSTANCES: float(s.image_count),
        Preference.THINNEST: -thickness,
        Preference.THICKEST: thickness,
    }
    return (*(keys[p] for p in prefs), float(s.image_count))


def select_series(
    rule: Rule, series: Sequence[SeriesInfo], show: bool = False
) -> tuple[SeriesInfo | None, str]:
    """The series the rule processes, or None with the reason none qualifies."""
    candidates, reasons = [], []
    for s in series:
        failure = series_failure(rule, s, show)
        if failure is None:
            candidates.append(s)
        else:
            reasons.append(f"{s.series_uid}: {failure}")
    if not candidates:
        return None, "no series qualifies (" + "; ".join(reasons or ["no series"]) + ")"
    best = max(candidates, key=lambda s: (_preference_key(rule.select.prefer, s), s.series_uid))
    return best, f"selected {best.series_uid} of {len(candidates)} candidate(s)"


def required_series_present(rule: Rule, series: Sequence[SeriesInfo]) -> bool:
    """Whether the rule states required series and the study holds all of them."""
    if not rule.enabled or not rule.require_series:
        return False
    return all(
        any(
            s.instance_count >= req.min_instances and _failing(req.match, s.tags) is None
            for s in series
        )
        for req in rule.require_series
    )


# -- rules -------------------------------------------------------------------------------------
def _verdict(rule: Rule, ctx: StudyContext, show: bool) -> Verdict:
    if not rule.enabled:
        return Verdict(rule, False, "disabled")
    if rule.when is not None:
        failure = when_failure(rule.when, ctx, show)
        if failure:
            return Verdict(rule, False, failure)
    if rule.action is Action.DISCARD:
        return Verdict(rule, True, "discards the study")
    chosen, reason = select_series(rule, ctx.series, show)
    return Verdict(rule, chosen is not None, reason, chosen.series_uid if chosen else None)


def explain(
    ctx: StudyContext, rules: Sequence[Rule], show_identifying: bool = False
) -> list[Verdict]:
    """Every rule's verdict in evaluation order, honouring ``stop`` and ``fallback``.

    Reasons quote the values seen, except those of identifying attributes, which are
    withheld unless ``show_identifying`` (the rules CLI, run on the author's own files).
    """
    show = show_identifying
    verdicts: list[Verdict] = []
    stopped = False
    rules = sorted(rules, key=lambda r: r.order)  # stable: equal orders keep file order
    for rule in [r for r in rules if not r.fallback]:
        if stopped:
            verdicts.append(Verdict(rule, False, "not evaluated: an earlier rule stopped"))
            continue
        verdict = _verdict(rule, ctx, show)
        verdicts.append(verdict)
        stopped = verdict.matched and rule.stop
    any_matched = any(v.matched for v in verdicts)
    for rule in [r for r in rules if r.fallback]:
        verdicts.append(
            Verdict(rule, False, "fallback: another rule matched")
            if any_matched
            else _verdict(rule, ctx, show)
        )
    return verdicts


def decide(ctx: StudyContext, rules: Sequence[Rule]) -> list[Decision]:
    """What to do with a study: one decision per matching rule."""
    return [Decision(v.rule, v.series_uid) for v in explain(ctx, rules) if v.matched]
