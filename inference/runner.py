"""Run one model card on one volume: MONAI pre-processing, the Triton call(s), post-processing.

Classic models (``input.kind: hu_affine``) take the raw volume and answer labels on the same grid.
Tensor models get the volume the MONAI way: a channel-first ``MetaTensor`` in RAS, re-oriented,
resampled and intensity-scaled as the card says; then the network runs on the whole volume, on
3D patches (``sliding_window_inference`` with the Triton call as predictor, patches batched per
request) or on axial slices; its output is activated (softmax / sigmoid), resampled back onto
the source grid and post-processed there (threshold / argmax, small components, holes).

The predictor is a seam: ``predict(batch) -> output`` is a Triton request in the node and an
in-process TorchScript call in training and in the benchmark's baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from airouter.core.vocab import Activation
from inference.algorithms import fill_holes_per_slice, largest_component, voxel_ml
from inference.cards import InputKind, InputMode, ModelCard, Task
from inference.triton import InferenceClient
from inference.volume import Allocator

Predictor = Callable[[np.ndarray], np.ndarray]  # (B, C_in, *spatial) -> (B, C_out, *spatial)

# Our volumes' affines map (k, j, i) to LPS; MONAI's MetaTensor affines are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class ModelOutput:
    """What a model gave for one volume, on the source grid."""

    labels: np.ndarray | None = None  # uint8 (slices, rows, columns); label values of the card
    # or, from a model whose card says labels_as_bits: each label's mask packed along the rows,
    # uint8 (labels, slices, rows, ceil(columns / 8)), label value v at index v - 1
    label_bits: np.ndarray | None = None
    # Per label value: the model's probability as uint8 0..255 (for explainability).
    probabilities: dict[int, np.ndarray] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)  # classification: label name -> score
    timings: dict[str, float] = field(default_factory=dict)


def warm_up() -> None:
    """Import torch and MONAI ahead of the first job (about 2 s on this machine)."""
    import monai.inferers
    import monai.transforms  # noqa: F401


def triton_predictor(client: InferenceClient, card: ModelCard) -> Predictor:
    """The Triton call for one batch of a tensor model."""
    dtype = {"FP32": np.float32, "FP16": np.float16}.get(card.input.dtype, np.float32)

    def predict(batch: np.ndarray) -> np.ndarray:
        shape = (batch.shape[0], card.input.output_channels, *batch.shape[2:])
        if card.task is Task.CLASSIFICATION:
            shape = (batch.shape[0], card.input.output_channels)
        out = client.infer(
            card.triton_model,
            {card.input.tensor: batch.astype(dtype, copy=False)},
            {card.input.output_tensor: (np.dtype(np.float32), shape)},
        )
        return out[card.input.output_tensor]

    return predict


def torchscript_predictor(
    module: Any, device: str = "cpu", seconds: list[float] | None = None
) -> Predictor:
    """The same network called in process (training, tests, the benchmarks' baseline);
    ``seconds`` collects each call's compute time."""
    import torch

    def predict(batch: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            y: np.ndarray = module(x).cpu().numpy()
        if seconds is not None:
            seconds.append(time.perf_counter() - t0)
        return y

    return predict


def timed_in_process(
    card: ModelCard, hu: np.ndarray, affine: np.ndarray, module: Any, device: str = "cpu"
) -> tuple[ModelOutput, dict[str, float]]:
    """:func:`run_model` with an in-process predictor: its output and the seconds spent in
    pre-processing, network compute, post-processing and in all."""
    compute: list[float] = []
    t0 = time.perf_counter()
    out = run_model(card, hu, affine, predict=torchscript_predictor(module, device, compute))
    return out, {
        "pre": out.timings["preprocess_s"],
        "compute": sum(compute),
        "post": out.timings["postprocess_s"],
        "total": time.perf_counter() - t0,
    }


def mask_tensor(
    labels: np.ndarray, label: int, packed: bool, allocate: Allocator | None = None
) -> np.ndarray:
    """The mask of ``label`` as a uint8 tensor: 0/1 per voxel, or ``packed`` as bits along
    each row (see ``UsesOutput``); slab by slab, never a full-size temporary. ``allocate``
    makes the packed tensor (in a shared-memory region the model reads it from)."""
    if not packed:
        return (labels == label).view(np.uint8)
    shape = (*labels.shape[:-1], -(-labels.shape[-1] // 8))
    out = np.empty(shape, dtype=np.uint8) if allocate is None else allocate(shape, np.uint8)
    for k in range(0, len(labels), 16):
        out[k : k + 16] = np.packbits(labels[k : k + 16] == label, axis=-1)
    return out


def run_model(
    card: ModelCard,
    hu: np.ndarray,
    affine: np.ndarray,
    client: InferenceClient | None = None,
    predict: Predictor | None = None,
    uses: np.ndarray | None = None,
    allocate: Allocator | None = None,
) -> ModelOutput:
    """Run ``card`` on a volume (``hu``: (slices, rows, columns), ``affine``: index -> LPS).
    ``uses``: the labels of the model the card's ``input.uses`` names, when it ran too;
    ``allocate``: where a classic model's labels are written (``InferenceClient.buffers``)."""
    if card.input.kind is InputKind.HU_AFFINE:
        if client is None:
            raise ValueError("a hu_affine model runs on the server: a client is needed")
        extra = None
        if uses is not None and card.input.uses is not None:
            wanted = card.input.uses
            extra = {wanted.tensor: mask_tensor(uses, wanted.label, wanted.packed, allocate)}
        t0 = time.perf_counter()
        if card.input.labels_as_bits and allocate is not None:
            count = max(label.value for label in card.labels)
            bits = client.segment_bits(card.triton_model, hu, affine, count, allocate, extra)
            if bits is not None:
                return ModelOutput(label_bits=bits, timings={"infer_s": time.perf_counter() - t0})
        labels = client.segment(card.triton_model, hu, affine, extra, allocate)
        return ModelOutput(labels=labels, timings={"infer_s": time.perf_counter() - t0})
    if predict is None:
        if client is None:
            raise ValueError("a client or a predictor is needed")
        predict = triton_predictor(client, card)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    image, pre_affine = preprocess(card, hu, affine)
    timings["preprocess_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if card.task is Task.CLASSIFICATION:
        logits = predict(image[None])[0]
        timings["infer_s"] = time.perf_counter() - t0
        scores = _activate(card, logits[:, None])[:, 0]
        return ModelOutput(
            scores={
                label.name: float(scores[label.value if scores.shape[0] > 1 else 0])
                for label in card.labels
            },
            timings=timings,
        )
    logits = _infer_dense(card, image, predict)
    timings["infer_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = _activate(card, logits)
    labels, probabilities = postprocess(card, probs, pre_affine, affine, hu.shape)
    timings["postprocess_s"] = time.perf_counter() - t0
    return ModelOutput(labels=labels, probabilities=probabilities, timings=timings)


# -- pre-processing ---------------------------------------------------------------------------
def preprocess(card: ModelCard, hu: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Any]:
    """MONAI transforms of the card on the volume; returns the channel-first float32 array and
    its RAS affine (a 4x4 numpy array)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import (
        Compose,
        CropForeground,
        Orientation,
        ScaleIntensityRange,
        Spacing,
    )

    pre = card.preprocessing
    transforms: list[Any] = []
    if pre.orientation:
        transforms.append(Orientation(axcodes=pre.orientation, labels=None))
    if pre.spacing:
        transforms.append(Spacing(pixdim=pre.spacing, mode="bilinear", padding_mode="border"))
    if pre.intensity:
        i = pre.intensity
        transforms.append(ScaleIntensityRange(i.a_min, i.a_max, i.b_min, i.b_max, clip=i.clip))
    if pre.crop_foreground_above is not None:
        level = pre.crop_foreground_above
        transforms.append(CropForeground(select_fn=lambda x: x > level, allow_smaller=True))
    image = MetaTensor(
        torch.from_numpy(hu.astype(np.float32))[None],
        affine=torch.as_tensor(LPS_TO_RAS @ affine, dtype=torch.float64),
    )
    out = Compose(transforms)(image) if transforms else image
    array = out.detach().cpu().numpy().astype(np.float32, copy=False)
    return array, np.asarray(out.affine, dtype=np.float64)


# -- the network ------------------------------------------------------------------------------
def _infer_dense(card: ModelCard, image: np.ndarray, predict: Predictor) -> np.ndarray:
    """(C_in, X, Y, Z) -> (C_out, X, Y, Z) logits."""
    mode = card.input.mode
    if mode is InputMode.VOLUME:
        spatial = image.shape[1:]
        m = card.input.divisible_by
        padded = [(0, (-n) % m) for n in spatial]
        batch = np.pad(image, [(0, 0), *padded], mode="edge")[None]
        out = predict(batch)[0]
        return out[(slice(None), *(slice(0, n) for n in spatial))]
    if mode is InputMode.SLICE:
        b = card.input.batch_size
        depth = image.shape[-1]
        outs = []
        for start in range(0, depth, b):
            chunk = np.moveaxis(image[..., start : start + b], -1, 0)  # (B, C, X, Y)
            outs.append(predict(np.ascontiguousarray(chunk)))
        return np.moveaxis(np.concatenate(outs, axis=0), 0, -1)
    import torch
    from monai.inferers import sliding_window_inference

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        out = predict(batch.detach().cpu().numpy())
        return torch.from_numpy(np.require(out, requirements=["W", "C"]))

    assert card.input.patch_size is not None
    with torch.no_grad():
        out = sliding_window_inference(
            torch.from_numpy(image)[None],
            roi_size=card.input.patch_size,
            sw_batch_size=card.input.batch_size,
            predictor=predictor,
            overlap=card.input.overlap,
            mode="gaussian",
            padding_mode="replicate",
        )
    assert isinstance(out, torch.Tensor)
    return out[0].numpy()


def _activate(card: ModelCard, logits: np.ndarray) -> np.ndarray:
    act = card.postprocessing.activation
    if act is Activation.SOFTMAX:
        shifted = logits - logits.max(axis=0, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=0, keepdims=True)
    if act is Activation.SIGMOID:
        return 1.0 / (1.0 + np.exp(-logits))
    return logits


# -- back onto the source grid and post-processing ----------------------------------------------
def postprocess(
    card: ModelCard,
    probs: np.ndarray,
    pre_affine: np.ndarray,
    src_affine: np.ndarray,
    shape: tuple[int, ...],
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Resample the per-channel probabilities onto the source grid, then label.

    softmax: channel c is label value c (0 background), the label is the argmax; sigmoid: channel
    c-1 is label value c, each thresholded (later labels win overlaps).
    """
    post = card.postprocessing
    values = [label.value for label in card.labels]
    channel_of = {v: (v if post.activation is Activation.SOFTMAX else v - 1) for v in values}
    src_ras = LPS_TO_RAS @ src_affine
    on_source = {
        v: resample_to_source(probs[channel_of[v]], pre_affine, src_ras, shape) for v in values
    }
    labels = np.zeros(shape, dtype=np.uint8)
    if post.activation is Activation.SOFTMAX:
        # Linear interpolation keeps the channels summing to one: the background is what the
        # labels leave, unless some channel is not a label of the card.
        if len(values) == probs.shape[0] - 1:
            best = 1.0 - sum(on_source.values())
        else:
            best = resample_to_source(probs[0], pre_affine, src_ras, shape)
        for v in values:
            better = on_source[v] > best
            labels[better] = v
            best = np.where(better, on_source[v], best)
    else:
        for v in values:
            labels[on_source[v] >= post.threshold] = v
    ml = voxel_ml(src_affine)
    for v in values:
        _clean_label(labels, v, post, ml)
    probabilities = {}
    for v, p in on_source.items():
        np.multiply(p, 255.0, out=p)
        p += 0.5
        np.clip(p, 0, 255, out=p)
        probabilities[v] = p.astype(np.uint8)
    return labels, probabilities


def _clean_label(labels: np.ndarray, value: int, post: Any, ml: float) -> None:
    """Post-processing of one label in place, within the label's bounding box."""
    mask_all = labels == value
    if not mask_all.any():
        return
    if not (post.keep_largest_component or post.min_component_ml > 0 or post.fill_holes):
        return
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(mask_all))
    if post.fill_holes:  # holes reach the border of the box only through the box's edge
        box = (
            box[0],
            *tuple(
                slice(max(0, b.start - 1), min(n, b.stop + 1))
                for b, n in zip(box[1:], labels.shape[1:], strict=True)
            ),
        )
    sub = labels[box]
    mask = sub == value
    cleaned = mask
    if post.keep_largest_component:
        cleaned = largest_component(cleaned)
    if post.min_component_ml > 0:
        comp, _ = ndimage.label(cleaned)
        sizes = np.bincount(comp.ravel()) * ml
        sizes[0] = 0
        cleaned = np.isin(comp, np.flatnonzero(sizes >= post.min_component_ml))
    if post.fill_holes:
        cleaned = fill_holes_per_slice(cleaned) & ((sub == 0) | mask)
    sub[mask & ~cleaned] = 0
    sub[cleaned] = value


def resample_to_source(
    values: np.ndarray, pre_affine: np.ndarray, src_affine: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """Trilinear resampling of ``values`` (on the grid of ``pre_affine``) at every voxel of the
    source grid (``src_affine``, ``shape``); both affines index -> the same patient space.

    When the two grids are axis-aligned (the usual case: a permutation, flips and scaling) this
    is separable, three 1D interpolations; otherwise (gantry tilt, oblique) it is a general
    affine resampling.
    """
    m = np.linalg.inv(pre_affine) @ src_affine  # source index -> pre-processed index
    lin = m[:3, :3]
    nonzero = np.abs(lin) > 1e-9
    values = values.astype(np.float32, copy=False)
    if not (nonzero.sum(axis=0) == 1).all() or not (nonzero.sum(axis=1) == 1).all():
        return ndimage.affine_transform(
            values, lin, offset=m[:3, 3], output_shape=shape, order=1, mode="nearest"
        ).astype(np.float32)
    out = values
    # Source axis a reads pre-processed axis p(a): bring those axes into source order first.
    perm = [int(np.flatnonzero(nonzero[:, a])[0]) for a in range(3)]
    out = np.transpose(out, perm)
    for axis in range(3):
        p = perm[axis]
        coords = lin[p, axis] * np.arange(shape[axis]) + m[p, 3]
        out = _interp_axis(out, coords, axis)
    return out


def _interp_axis(values: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    n = values.shape[axis]
    coords = np.clip(coords, 0, n - 1)
    lo = np.floor(coords).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    w = (coords - lo).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = len(coords)
    w = w.reshape(shape)
    a = np.take(values, lo, axis=axis)
    b = np.take(values, hi, axis=axis)
    return a + (b - a) * w
