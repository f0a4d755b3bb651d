"""Rules are data: YAML files validated into typed models (unknown keys rejected).

A rule file holds ``rules: [...]``. Each rule says when it applies (a study-level condition
tree ``when`` and series-level conditions ``match``), how to pick the series to process, what
to do (run models, forward the series as-is, or discard the study), and where results go.
Errors name the file, the line and the key. Nothing in a rule is ever executed as code.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydicom.datadict import tag_for_keyword

from airouter.core.qc import QualityChecks
from airouter.core.vocab import Action, OutputKind, Priority, Review, RunMode, SegType
from airouter.core.yamlconf import problem


class Orientation(enum.StrEnum):
    """A series' orientation, from the slice normal's main axis."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"
    OBLIQUE = "oblique"


class Preference(enum.StrEnum):
    """How to choose among the series that qualify."""

    MOST_INSTANCES = "most_instances"
    THINNEST = "thinnest"
    THICKEST = "thickest"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(_Strict):
    """A numeric range with an inclusive minimum, maximum or both."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("range min is greater than max")
        return self


OPERATORS = ("equals", "one_of", "regex", "range", "contains", "present")


class Condition(_Strict):
    """One test on a value; exactly one operator is given.

    ``equals`` / ``one_of`` / ``regex`` hold when any value of a multi-valued attribute does;
    ``contains`` tests for one value of a multi-valued attribute (ImageType); ``range``
    holds when every value is a number within it (PatientAge is read in years);
    ``present`` tests that the attribute has a value (or, false, that it has none).
    """

    equals: str | float | None = None
    one_of: list[str | float] | None = None
    regex: str | None = None
    range: Range | None = None
    contains: str | None = None
    present: bool | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _one_operator(self) -> Condition:
        given = [k for k in OPERATORS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a condition needs exactly one of: {', '.join(OPERATORS)}")
        return self

    def describe(self) -> str:
        """The condition as the explanations print it (``range [18, None]``)."""
        op = next(k for k in OPERATORS if getattr(self, k) is not None)
        value = getattr(self, op)
        if isinstance(value, Range):
            value = f"[{value.min}, {value.max}]"
        return f"{op} {value}"


def _coerce_condition(value: Any) -> Any:
    """Short forms: a scalar means ``equals``, a list means ``one_of``."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return {"equals": value}
    if isinstance(value, list):
        return {"one_of": value}
    return value


def _keyword_conditions(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _coerce_condition(v) for k, v in value.items()}
    return value


def _check_keywords(value: dict[str, Condition]) -> dict[str, Condition]:
    for keyword in value:
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"unknown DICOM keyword: {keyword}")
    return value


class SeriesConditions(_Strict):
    """Conditions on DICOM keywords of one series, all of which must hold."""

    conditions: dict[str, Condition]

    @model_validator(mode="before")
    @classmethod
    def _wrap(cls, value: Any) -> Any:
        return {"conditions": _keyword_conditions(value)} if isinstance(value, dict) else value

    @field_validator("conditions")
    @classmethod
    def _keywords(cls, value: dict[str, Condition]) -> dict[str, Condition]:
        return _check_keywords(value)


NODE_KEYS = (
    "all",
    "any",
    "not",
    "any_series",
    "all_series",
    "calling_ae",
    "called_ae",
    "source_address",
)


class When(_Strict):
    """A study-level condition tree. One kind of node per mapping:

    ``all: [...]``, ``any: [...]``, ``not: {...}``; ``any_series: {Keyword: cond}`` (some series
    satisfies them all), ``all_series: {...}``; ``calling_ae``, ``called_ae``,
    ``source_address``: a condition on where the study came from; or ``{Keyword: cond, ...}``:
    study-level attributes (from the study's series), all of which must hold.
    """

    all_of: list[When] | None = None
    any_of: list[When] | None = None
    not_: When | None = None
    any_series: SeriesConditions | None = None
    all_series: SeriesConditions | None = None
    calling_ae: Condition | None = None
    called_ae: Condition | None = None
    source_address: Condition | None = None
    keywords: dict[str, Condition] | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("a condition node must be a mapping")
        node_keys = [k for k in value if k in NODE_KEYS]
        if node_keys and len(value) != 1:
            raise ValueError(f"'{node_keys[0]}' must be the only key of its mapping")
        if not node_keys:
            return {"keywords": _keyword_conditions(value)}
        key, inner = next(iter(value.items()))
        if key in ("calling_ae", "called_ae", "source_address"):
            inner = _coerce_condition(inner)
        return {{"all": "all_of", "any": "any_of", "not": "not_"}.get(key, key): inner}

    @field_validator("keywords")
    @classmethod
    def _keywords(cls, value: dict[str, Condition] | None) -> dict[str, Condition] | None:
        return _check_keywords(value) if value is not None else None


class SeriesSelection(_Strict):
    """How to pick the series to process among those that match: filters, then preferences.

    Series descriptions are not trusted for this; the image's own attributes are.
    """

    orientation: Orientation | None = Orientation.AXIAL  # from ImageOrientationPatient
    image_types: list[str] = Field(default_factory=list)  # all must be in ImageType
    exclude_image_types: list[str] = Field(default_factory=lambda: ["LOCALIZER"])
    slice_thickness_mm: Range | None = None
    min_instances: int = Field(default=1, ge=1)
    contrast: bool | None = None  # ContrastBolusAgent present (true) or absent (false)
    prefer: list[Preference] = Field(default_factory=lambda: [Preference.MOST_INSTANCES])


class _KeywordMatch(_Strict):
    """A ``match`` of DICOM keywords to conditions (short forms allowed, keywords checked)."""

    match: dict[str, Condition] = Field(default_factory=dict)

    @field_validator("match", mode="before")
    @classmethod
    def _short(cls, value: Any) -> Any:
        return _keyword_conditions(value)

    @field_validator("match")
    @classmethod
    def _known(cls, value: dict[str, Condition]) -> dict[str, Condition]:
        return _check_keywords(value)


class RequiredSeries(_KeywordMatch):
    """A series the study must hold for the rule: conditions on keywords and a minimum count."""

    min_instances: int = Field(default=1, ge=1)


class PriorComparison(_Strict):
    """``compare_with_prior``: the SR compares each structure with the patient's previous
    study of the same modality (and body part, where both say), measured by the same models
    on its images: found in the node's archive first, then in ``source`` (a configured DICOM
    destination: C-FIND by Patient ID and issuer, C-GET of the series)."""

    source: str | None = None
    max_interval_days: int | None = Field(default=None, ge=1)  # an older study is no prior
    min_instances: int = Field(default=5, ge=1)  # of the prior series


def _prior(value: Any) -> Any:
    """``compare_with_prior: true`` is the archive only; a mapping gives the options."""
    if value is True:
        return PriorComparison()
    if value is False:
        return None
    return value


class Rule(_KeywordMatch):
    """One rule: when it applies, which series it takes, what it does and where results go."""

    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    enabled: bool = True
    order: int = 0  # lower first; equal orders keep file order
    stop: bool = False  # when it matches, later rules are not evaluated
    fallback: bool = False  # applies only when no other rule matched
    priority: Priority = Priority.ROUTINE
    off_hours: bool = False  # routine work that waits for the configured off-hours window
    when: When | None = None
    select: SeriesSelection = Field(default_factory=SeriesSelection)
    action: Action = Action.RUN
    models: list[str] = Field(default_factory=list)
    outputs: list[OutputKind] = Field(
        default_factory=lambda: [OutputKind.SEG, OutputKind.SR, OutputKind.RTSTRUCT]
    )
    seg_type: SegType = SegType.BINARY
    destinations: list[str] = Field(default_factory=list)
    # required: results are archived, their deliveries wait for an operator's approval
    review: Review = Review.NONE
    # shadow: run and archive, send only to destinations marked test: true
    mode: RunMode = RunMode.CLINICAL
    # the site structure template of its results (names, colours, types; see config/templates)
    template: str | None = None
    # input quality checks before any model runs, and what a failure does (airouter.core.qc)
    qc: QualityChecks | None = None
    # Once every required series is present (and the senders are done), the study completes
    # without waiting for the quiet period.
    require_series: list[RequiredSeries] = Field(default_factory=list)
    # The study completes as soon as its senders have released their associations, without
    # the quiet period: for modalities that send each series whole on one association.
    complete_on_release: bool = False
    # the SR compares with the patient's previous study (true, or {source: pacs, ...})
    compare_with_prior: Annotated[PriorComparison | None, BeforeValidator(_prior)] = None
    # a series whose pixels may carry burned-in text (Burned In Annotation YES, or unknown
    # for US, SC ...) may go to its de-identifying (off-site) destinations: someone checked
    allow_burned_in: bool = False
    _file: str = PrivateAttr(default="")  # the file it was loaded from

    @property
    def file(self) -> str:
        """The rule file it was loaded from ("" for rules parsed from text)."""
        return self._file

    @field_validator("outputs")
    @classmethod
    def _produced(cls, value: list[OutputKind]) -> list[OutputKind]:
        wrong = [o.value for o in value if o not in OutputKind.produced()]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not an output a model run writes")
        return value

    @model_validator(mode="after")
    def _action_needs(self) -> Rule:
        if self.action is Action.EVALUATE:
            raise ValueError("action: evaluate is the node's own (a structure set sent back)")
        if self.action is Action.RUN and not self.models:
            raise ValueError("models: a rule that runs models needs at least one")
        if self.action is Action.FORWARD and not self.destinations:
            raise ValueError("destinations: a forwarding rule needs at least one")
        return self


def models_in_use(rules: Sequence[Rule]) -> set[str]:
    """The models the enabled rules among ``rules`` run: what the inference server must have
    loaded (a model no rule names is not loaded, unless a job asks for it)."""
    return {m for r in rules if r.enabled and r.action is Action.RUN for m in r.models}


class RuleFile(_Strict):
    """A rule file: ``rules: [...]``."""

    rules: list[Rule]


class RuleError(Exception):
    """A rule file that cannot be loaded; the message names the file, the line and the key."""


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Map model field names back to the rule file's keys."""
    names = {"all_of": "all", "any_of": "any", "not_": "not", "conditions": None, "keywords": None}
    return tuple(names.get(p, p) for p in loc if names.get(p, p) is not None)


def parse_rules(text: str, source: str) -> list[Rule]:
    """Validate rule-file text; errors as ``source:line: key: message``."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"{source}: {exc}") from exc
    try:
        return RuleFile.model_validate(data).rules
    except ValidationError as exc:
        problems = [
            problem(source, root, _clean_loc(tuple(err["loc"])), err["msg"]) for err in exc.errors()
        ]
        raise RuleError("\n".join(problems)) from exc


def load_rule_file(path: Path) -> list[Rule]:
    """Load and validate one rule file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"{path}: {exc}") from exc
    rules = parse_rules(text, str(path))
    for rule in rules:
        rule._file = str(path)
    return rules


def load_rules(directory: Path) -> list[Rule]:
    """All rules of ``directory/*.yaml``, in their evaluation order; names must be unique."""
    if not directory.is_dir():
        raise RuleError(f"{directory}: rules directory not found")
    rules: list[Rule] = []
    errors: list[str] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            rules.extend(load_rule_file(path))
        except RuleError as exc:
            errors.append(str(exc))
    if errors:
        raise RuleError("\n".join(errors))
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RuleError(f"{directory}: duplicate rule names: {', '.join(dupes)}")
    return sorted(rules, key=lambda r: r.order)  # stable: equal orders keep file order
