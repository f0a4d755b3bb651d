"""Input quality checks a rule asks for (``qc:``), checked on the volume before inference.

Each check that is given is run; what fails is reported in the job (event ``qc_failed`` or
``qc_warning``, with the check's name and the value found) and, on a run that goes on, in the
SR (an "Input quality" finding; structures then not found are "not assessable", not "Absent").
With ``action: reject`` the job runs no model: it ends ``rejected`` with the reasons, or, when
``report: true``, delivers a short SR that says why and ends ``done``.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class QcAction(enum.StrEnum):
    """What a failed input quality check does to the job."""

    REJECT = "reject"  # no model runs
    WARN = "warn"  # the job goes on; the job and the SR say what failed


class Bounds(BaseModel):
    """An inclusive range; either end may be open."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("range min is greater than max")
        return self

    def holds(self, value: float) -> bool:
        """Whether ``value`` lies within the range."""
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        """``[min, max]`` with open ends shown as such."""
        low = "-inf" if self.min is None else f"{self.min:g}"
        high = "inf" if self.max is None else f"{self.max:g}"
        return f"[{low}, {high}]"


class QualityChecks(BaseModel):
    """A rule's ``qc:``: the checks to run (those given) and what a failure does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: QcAction = QcAction.WARN
    report: bool = False  # on reject: deliver a short SR that says why
    # a gap between slices of about two or more times the series' usual spacing (within 30 %
    # of a whole number of spacings: that many slices less one are missing)
    missing_slices: bool = False
    # two images at one position (the first one is kept when the job goes on)
    duplicate_slices: bool = False
    # the largest departure (mm) of a slice from the usual spacing (gaps of whole missing
    # slices are the missing_slices check's)
    spacing_tolerance_mm: float | None = Field(default=None, gt=0)
    # the largest angle (degrees) between the slice stack and the nearest patient axis:
    # gantry tilt and oblique orientation
    max_tilt_deg: float | None = Field(default=None, ge=0, le=90)
    pixel_spacing_mm: Bounds | None = None
    slice_thickness_mm: Bounds | None = None
    # the HU of air (the 5th percentile of voxels between -1500 and -500): about -1000 on a
    # CT whose rescale is right
    air_hu: Bounds | None = None
    # slices where tissue runs along the image border for more than truncation_run_mm: the
    # field of view cuts the patient; at most this many are accepted
    max_truncated_slices: int | None = Field(default=None, ge=0)
    truncation_run_mm: float = Field(default=40.0, gt=0)
    images: Bounds | None = None  # how many slices (frames) the series has
