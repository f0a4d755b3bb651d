"""Site structure templates: how a department names, colours and types the structures it plans on.

A template file holds ``templates: [...]``. A template maps a model's label (``model``,
``label``) to the ROI name planning systems see (TG-263 style: at most 16 characters, letters,
digits and ``_ ^ -``, unique regardless of case), its colour, RT ROI Interpreted Type and ROI
observation label, and says which structures are sent (only those listed, or all), whether a
structure listed and not found gets an empty ROI (a placeholder the planner fills), the
Structure Set Label and Name, and whether the results are marked ``NOT FOR CLINICAL USE``
(research). The SEG's segment labels and the SR's findings follow the same names.

A template is chosen per destination, else per rule, else the site's default
(``encoders.template``). Errors name the file, the line and the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from airouter.core.vocab import RTROIType
from airouter.core.yamlconf import problem

NOT_FOR_CLINICAL_USE = "NOT FOR CLINICAL USE"
# TG-263: at most 16 characters; letters, digits, underscore, caret, hyphen; no spaces.
_TG263 = re.compile(r"^[A-Za-z0-9_^\-]{1,16}$")


class TemplateError(Exception):
    """A template file that cannot be loaded; the message names the file, the line and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TemplateStructure(_Strict):
    """One structure: which model label it is, and how the objects name and show it."""

    model: str  # the model card's name
    label: str  # the label's name in that card
    name: str  # ROIName, segment label, the SR's tracking identifier
    color: tuple[int, int, int] | None = None  # RGB 0-255; the card's colour when absent
    type: RTROIType | None = None  # RTROIInterpretedType; the card's when absent
    observation_label: Annotated[str, Field(max_length=16)] | None = None

    @field_validator("name")
    @classmethod
    def _tg263(cls, value: str) -> str:
        if not _TG263.match(value):
            raise ValueError(
                f"{value!r}: a structure name has at most 16 characters, letters, digits "
                "and _ ^ - only (TG-263)"
            )
        return value

    @field_validator("color")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and not all(0 <= c <= 255 for c in value):
            raise ValueError("a colour is three values from 0 to 255")
        return value


class StructureSetNames(_Strict):
    """The RTSTRUCT's Structure Set Label (SH) and Name (LO)."""

    label: Annotated[str, Field(min_length=1, max_length=16)] = "AI"
    name: Annotated[str, Field(max_length=64)] | None = None  # the series description


class Template(_Strict):
    """One site structure template."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    structure_set: StructureSetNames = Field(default_factory=StructureSetNames)
    research: bool = False  # results marked NOT FOR CLINICAL USE
    only_listed: bool = True  # structures the template does not list are not sent
    placeholders: bool = False  # a listed structure not found: an ROI without contours
    structures: list[TemplateStructure] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Template:
        names = [s.name.upper() for s in self.structures]
        dupes = sorted({s.name for s in self.structures if names.count(s.name.upper()) > 1})
        if dupes:
            raise ValueError(
                f"structure names must be unique regardless of case: {', '.join(dupes)}"
            )
        keys = [(s.model, s.label) for s in self.structures]
        twice = sorted({f"{m}/{label}" for m, label in keys if keys.count((m, label)) > 1})
        if twice:
            raise ValueError(f"a model label is listed twice: {', '.join(twice)}")
        return self

    def entry(self, model: str, label: str) -> TemplateStructure | None:
        """The template's entry for ``label`` of ``model``, if it lists one."""
        for s in self.structures:
            if s.model == model and s.label == label:
                return s
        return None


class TemplateFile(_Strict):
    """A template file: ``templates: [...]``."""

    templates: list[Template]


def parse_templates(text: str, source: str) -> list[Template]:
    """Validate template-file text; errors as ``source:line: key: message``."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise TemplateError(f"{source}: {exc}") from exc
    duplicates = _duplicate_names(data)
    if duplicates:
        raise TemplateError(
            "\n".join(
                problem(
                    source,
                    root,
                    loc,
                    f"{name!r} is already the name of {first} "
                    "(names must be unique regardless of case)",
                )
                for loc, name, first in duplicates
            )
        )
    try:
        return TemplateFile.model_validate(data).templates
    except ValidationError as exc:
        problems = [
            problem(source, root, tuple(err["loc"]), err["msg"].removeprefix("Value error, "))
            for err in exc.errors()
        ]
        raise TemplateError("\n".join(problems)) from exc


def _duplicate_names(data: object) -> list[tuple[tuple[object, ...], str, str]]:
    """Structure names a template gives twice (regardless of case): where the second one is,
    the name, and the structure that has it first."""
    found: list[tuple[tuple[object, ...], str, str]] = []
    templates = data.get("templates") if isinstance(data, dict) else None
    for i, template in enumerate(templates if isinstance(templates, list) else []):
        structures = template.get("structures") if isinstance(template, dict) else None
        seen: dict[str, str] = {}
        for j, item in enumerate(structures if isinstance(structures, list) else []):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str):
                continue
            if name.upper() in seen:
                found.append((("templates", i, "structures", j, "name"), name, seen[name.upper()]))
            else:
                seen[name.upper()] = f"{item.get('model')}/{item.get('label')}"
    return found


def load_templates(directory: Path) -> dict[str, Template]:
    """All templates of ``directory/*.yaml`` by name (none if the directory does not exist);
    names must be unique across files."""
    if not directory.is_dir():
        return {}
    found: dict[str, Template] = {}
    errors: list[str] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            text = path.read_text(encoding="utf-8")
            for template in parse_templates(text, str(path)):
                if template.name in found:
                    errors.append(f"{path}: template {template.name} is defined twice")
                found[template.name] = template
        except OSError as exc:
            errors.append(f"{path}: {exc}")
        except TemplateError as exc:
            errors.append(str(exc))
    if errors:
        raise TemplateError("\n".join(errors))
    return found
