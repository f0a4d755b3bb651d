"""What a job keeps beside its DICOM outputs: the models' raw masks, probabilities and scores
(``<jobs_dir>/<job id>/``), for audit, explainability and tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def save_masks(directory: Path, masks: dict[str, np.ndarray]) -> None:
    """The masks by ``model/label``, bit-packed (all of one shape); an empty one is named in
    ``_empty`` instead of stored (two empty lung masks of a 1,000-slice head CT cost 0.3 s to
    pack and compress, for nothing)."""
    directory.mkdir(parents=True, exist_ok=True)
    empty = [key for key, mask in masks.items() if not mask.any()]
    arrays = {key: np.packbits(mask) for key, mask in masks.items() if key not in empty}
    shape = next(iter(masks.values())).shape if masks else (0, 0, 0)
    np.savez_compressed(
        directory / "masks.npz",
        _shape=np.asarray(shape),
        _empty=np.asarray(empty, dtype=str),
        **arrays,
    )


def load_masks(path: Path) -> dict[str, np.ndarray]:
    """The masks a job saved, by ``model/label``, as boolean volumes (in the order saved;
    the empty ones after the others)."""
    with np.load(path) as data:
        shape = tuple(int(v) for v in data["_shape"])
        count = int(np.prod(shape))
        masks = {
            key: np.unpackbits(data[key], count=count).astype(bool).reshape(shape)
            for key in data.files
            if key not in ("_shape", "_empty")
        }
        empty = [str(key) for key in data["_empty"]] if "_empty" in data.files else []
    for key in empty:
        masks[key] = np.zeros(shape, dtype=bool)
    return masks


def save_probabilities(directory: Path, probabilities: dict[str, np.ndarray]) -> None:
    """The models' probability maps by ``model/label`` (uint8 0-255 on the source grid)."""
    directory.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(directory / "probabilities.npz", **probabilities)


def save_scores(directory: Path, scores: dict[str, dict[str, float]]) -> None:
    """Classification scores: model -> label -> score."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "scores.json").write_text(json.dumps(scores, indent=2))
