"""Model cards: YAML descriptions of the models the node can run (validated like rules)."""

from __future__ import annotations

import enum
import hashlib
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RTROIType(enum.StrEnum):
    """RT ROI Interpreted Type (PS3.3 C.8.8.8), the ones a model may declare."""

    EXTERNAL = "EXTERNAL"
    ORGAN = "ORGAN"
    AVOIDANCE = "AVOIDANCE"
    PTV = "PTV"
    CTV = "CTV"
    GTV = "GTV"


class CodedConcept(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: str
    value: str
    meaning: str


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    value: int = Field(ge=1, le=255)
    name: Annotated[str, Field(min_length=1, max_length=64)]
    category: CodedConcept
    type: CodedConcept
    color: tuple[int, int, int]
    rt_roi_type: RTROIType = RTROIType.ORGAN


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    triton_model: str
    modality: str
    description: str = ""
    labels: list[Label] = Field(min_length=1)
    checksum: str = ""  # sha256 of the card file, filled in at load


class ModelCardError(Exception):
    pass


def load_card(path: Path) -> ModelCard:
    raw = path.read_bytes()
    try:
        card = ModelCard.model_validate(yaml.safe_load(raw))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ModelCardError(f"{path}: {exc}") from exc
    return card.model_copy(update={"checksum": hashlib.sha256(raw).hexdigest()})


def load_cards(directory: Path) -> dict[str, ModelCard]:
    """All cards of ``directory/*.yaml`` by model name."""
    cards = [load_card(p) for p in sorted(directory.glob("*.yaml"))]
    if not cards:
        raise ModelCardError(f"{directory}: no model cards")
    return {c.name: c for c in cards}
