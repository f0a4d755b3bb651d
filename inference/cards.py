"""Model cards: YAML descriptions of the models the node can run (validated like rules)."""

from __future__ import annotations

import enum
import hashlib
import re
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from airouter.core.vocab import Activation, OutputKind, RTROIType, RunMode


class CodedConcept(BaseModel):
    """A code (scheme, value, meaning), as SEG and SR write it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: str
    value: str
    meaning: str


class Label(BaseModel):
    """One label value of a model's output: its name, codes, colour and RT ROI type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: int = Field(ge=1, le=255)
    name: Annotated[str, Field(min_length=1, max_length=64)]
    category: CodedConcept
    type: CodedConcept
    color: tuple[int, int, int]
    rt_roi_type: RTROIType = RTROIType.ORGAN


class InputKind(enum.StrEnum):
    # The raw volume in modality units (INT16 "CT") and its 4x4 index->patient affine
    # ("AFFINE"); the model does its own pre/post-processing on the server (classic models).
    """What the model takes: the raw volume and its affine, or a pre-processed tensor."""

    HU_AFFINE = "hu_affine"
    # A pre-processed float tensor (channel first); the node runs MONAI pre/post-processing.
    TENSOR = "tensor"


class InputMode(enum.StrEnum):
    """How a tensor model sees the volume: whole, in 3D patches or slice by slice."""

    VOLUME = "volume"  # the whole (pre-processed) volume in one request
    PATCH = "patch"  # 3D patches, MONAI sliding_window_inference, batched per request
    SLICE = "slice"  # a 2D model applied to each axial slice, batched per request


class UsesOutput(BaseModel):
    """Another model's result a classic model can take as an extra input: the mask of
    ``label`` in ``model``'s labels, sent as the uint8 tensor ``tensor``. Given when both run
    in one job (the model then waits for the other and need not compute it again); the server
    model computes it itself otherwise. With ``packed`` the mask goes as bits, eight pixels a
    byte along each row (numpy ``packbits``, shape (slices, rows, ceil(columns / 8))): an
    eighth of the bytes to copy and to hold on both sides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    label: int = Field(ge=1, le=255)
    tensor: str
    packed: bool = False


class ModelInput(BaseModel):
    """The model's tensors on the server and how the volume is cut into requests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: InputKind = InputKind.HU_AFFINE
    mode: InputMode = InputMode.VOLUME
    tensor: str = "CT"  # input tensor name on the server
    output_tensor: str = "LABELS"
    channels: int = Field(default=1, ge=1)
    dtype: str = Field(default="INT16", pattern="^(INT16|FP32|FP16)$")
    output_channels: int = Field(default=1, ge=1)  # tensor models: channels of the output
    patch_size: tuple[int, ...] | None = None  # patch mode: (x, y, z) after orientation
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    batch_size: int = Field(default=4, ge=1)  # patches or slices per request
    divisible_by: int = Field(default=1, ge=1)  # volume mode: pad spatial dims to a multiple
    uses: UsesOutput | None = None  # hu_affine models: another model's result, if it runs too
    # hu_affine models: each label's mask written as bits (packed along each row, label value
    # v at index v - 1) into the node's region when the tensors go by reference, instead of a
    # uint8 label volume: an eighth of the memory (the volume's labels otherwise)
    labels_as_bits: bool = False


class IntensityScaling(BaseModel):
    """MONAI ScaleIntensityRange: [a_min, a_max] (e.g. a HU window) -> [b_min, b_max]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True


class Preprocessing(BaseModel):
    """MONAI pre-processing of a tensor model's input, as the card states it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    orientation: str | None = Field(default=None, pattern="^[LRAPSI]{3}$")
    spacing: tuple[float, float, float] | None = None  # mm, after orientation
    intensity: IntensityScaling | None = None
    crop_foreground_above: float | None = None  # crop to where the input exceeds this value


class Postprocessing(BaseModel):
    """Applied on the source grid, after the model's output is resampled back onto it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    activation: Activation = Activation.SOFTMAX
    # softmax outputs: argmax over channels (channel = label value); sigmoid: threshold each.
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    keep_largest_component: bool = False
    min_component_ml: float = Field(default=0.0, ge=0.0)
    fill_holes: bool = False  # per axial slice


class Task(enum.StrEnum):
    """What a model answers: a label volume or scores."""

    SEGMENTATION = "segmentation"
    CLASSIFICATION = "classification"


class ModelCard(BaseModel):
    """A model the node can run: what it is, what it takes, what it answers, how it was trained."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    version: str
    triton_model: str
    modality: str
    task: Task = Task.SEGMENTATION
    description: str = ""
    input: ModelInput = Field(default_factory=ModelInput)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    postprocessing: Postprocessing = Field(default_factory=Postprocessing)
    labels: list[Label] = Field(min_length=1)
    outputs: list[OutputKind] = Field(
        default_factory=lambda: [OutputKind.SEG, OutputKind.SR, OutputKind.RTSTRUCT]
    )
    # What it was trained on and how it measures up (free-form, shown by `models list`).
    training: dict[str, object] = Field(default_factory=dict)
    checksum: str = ""  # sha256 of the card file, filled in at load
    # shadow: every job that runs it is a shadow run (archived, sent to test destinations)
    mode: RunMode = RunMode.CLINICAL
    # Its server is outside the hospital: it gets voxels only (no DICOM attribute reaches
    # Triton), and a series whose pixels may carry burned-in text (Burned In Annotation YES,
    # or unknown for US, SC ...) is refused unless the rule has allow_burned_in.
    deidentify: bool = False
    # The regions in which the model can tell that a structure is absent: BodyPartExamined
    # values (PS3.16 Annex L defined terms). On a series whose BodyPartExamined names another
    # region, a structure the model did not find is "not assessable" (lungs on a head CT are
    # out of view, not missing). Empty: every region.
    body_parts: list[str] = Field(default_factory=list)

    @field_validator("body_parts")
    @classmethod
    def _defined_terms(cls, parts: list[str]) -> list[str]:
        for part in parts:
            if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", part):
                raise ValueError(
                    f"body_parts: {part!r} is not a BodyPartExamined value (CS: upper-case "
                    "letters, digits, space and underscore, at most 16)"
                )
        return parts

    def covers(self, body_part: str) -> bool:
        """Whether a structure this model did not find on a series of ``body_part`` (its
        BodyPartExamined; empty when unknown) is absent rather than out of view."""
        part = body_part.strip().upper()
        return not self.body_parts or not part or part in self.body_parts

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        values = [label.value for label in self.labels]
        if len(set(values)) != len(values):
            raise ValueError("labels: two labels share a value")
        if self.input.kind is InputKind.TENSOR:
            if self.input.labels_as_bits:
                raise ValueError("input.labels_as_bits: a hu_affine model's way of answering")
            if self.input.mode is InputMode.PATCH and not self.input.patch_size:
                raise ValueError("input.patch_size is required for mode: patch")
            top = max(values)
            if (
                self.postprocessing.activation is Activation.SOFTMAX
                and self.input.output_channels <= top
            ):
                raise ValueError(
                    f"input.output_channels: {self.input.output_channels} channels cannot "
                    f"hold label {top} after softmax (channel 0 is background)"
                )
        elif self.input.mode is not InputMode.VOLUME:
            raise ValueError("input.mode: hu_affine models take the whole volume")
        return self


class ModelCardError(Exception):
    """A card that cannot be loaded; the message names the file and the field."""

    pass


def load_card(path: Path) -> ModelCard:
    """Load and validate one card; its checksum is the file's SHA-256."""
    raw = path.read_bytes()
    try:
        card = ModelCard.model_validate(yaml.safe_load(raw))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ModelCardError(f"{path}: {exc}") from exc
    return card.model_copy(update={"checksum": hashlib.sha256(raw).hexdigest()})


def load_cards(*directories: Path) -> dict[str, ModelCard]:
    """All cards of ``directory/*.yaml`` by model name (later directories may add models, not
    replace them: two cards with one name are an error)."""
    cards: dict[str, ModelCard] = {}
    for directory in directories:
        for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
            card = load_card(path)
            if card.name in cards:
                raise ModelCardError(f"{path}: a model named {card.name} is already defined")
            cards[card.name] = card
    if not cards:
        raise ModelCardError(f"{', '.join(map(str, directories))}: no model cards")
    return cards
