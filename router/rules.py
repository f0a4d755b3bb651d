"""Rules are data: YAML files validated into typed models (unknown keys rejected).

A rule file holds ``rules: [...]``. Each rule says which series it applies to (conditions on
DICOM keywords), how to pick the series to process, which models to run, which outputs to write
and where to send them. Nothing in a rule is ever executed as code.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Priority(enum.StrEnum):
    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        """Higher runs first."""
        return {"stat": 300, "urgent": 200, "routine": 100}[self.value]


class OutputKind(enum.StrEnum):
    SEG = "SEG"
    SR = "SR"
    RTSTRUCT = "RTSTRUCT"


class Orientation(enum.StrEnum):
    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"
    OBLIQUE = "oblique"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Condition(_Strict):
    """One test on a DICOM keyword's value; exactly one operator is given."""

    equals: str | float | None = None
    one_of: list[str | float] | None = None
    regex: str | None = None

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
        given = [k for k in ("equals", "one_of", "regex") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a condition needs exactly one of: equals, one_of, regex")
        return self


def _coerce_condition(value: Any) -> Any:
    """Short forms: a scalar means ``equals``, a list means ``one_of``."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return {"equals": value}
    if isinstance(value, list):
        return {"one_of": value}
    return value


class SeriesSelection(_Strict):
    """How to pick the series to process among those that match."""

    orientation: Orientation | None = Orientation.AXIAL
    exclude_image_types: list[str] = Field(default_factory=lambda: ["LOCALIZER"])
    min_instances: int = Field(default=1, ge=1)


class RequiredSeries(_Strict):
    """A series the study must hold for the rule: conditions on keywords and a minimum count."""

    match: dict[str, Condition] = Field(default_factory=dict)
    min_instances: int = Field(default=1, ge=1)

    @field_validator("match", mode="before")
    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _coerce_condition(v) for k, v in value.items()}
        return value


class Rule(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    enabled: bool = True
    priority: Priority = Priority.ROUTINE
    match: dict[str, Condition] = Field(default_factory=dict)
    select: SeriesSelection = Field(default_factory=SeriesSelection)
    models: list[str] = Field(min_length=1)
    outputs: list[OutputKind] = Field(default_factory=lambda: list(OutputKind))
    destinations: list[str] = Field(default_factory=list)
    # Once every required series is present (and the senders are done), the study completes
    # without waiting for the quiet period.
    require_series: list[RequiredSeries] = Field(default_factory=list)

    @field_validator("match", mode="before")
    @classmethod
    def _short_forms(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _coerce_condition(v) for k, v in value.items()}
        return value

    @field_validator("match")
    @classmethod
    def _keywords(cls, value: dict[str, Condition]) -> dict[str, Condition]:
        from pydicom.datadict import tag_for_keyword

        for keyword in value:
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"unknown DICOM keyword: {keyword}")
        return value


class RuleFile(_Strict):
    rules: list[Rule]


class RuleError(Exception):
    """A rule file that cannot be loaded; the message names the file and the key."""


def load_rule_file(path: Path) -> list[Rule]:
    """Load and validate one rule file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RuleError(f"{path}: {exc}") from exc
    try:
        return RuleFile.model_validate(data).rules
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise RuleError(f"{path}: {problems}") from exc


def load_rules(directory: Path) -> list[Rule]:
    """All rules of ``directory/*.yaml`` in file-name order; names must be unique."""
    if not directory.is_dir():
        raise RuleError(f"{directory}: rules directory not found")
    rules: list[Rule] = []
    for path in sorted(directory.glob("*.yaml")):
        rules.extend(load_rule_file(path))
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RuleError(f"{directory}: duplicate rule names: {', '.join(dupes)}")
    return rules
