"""Train ct-lungs-unet, the bundled MONAI network model, on synthetic CT (no downloaded data).

    python -m inference.training.lungnet [--iterations N] [--seed S]

Training data: randomised chest phantoms (``inference.training.phantoms.random_chest_phantom``) and
skull phantoms (air inside a closed bone shell, no lungs), labelled by the classic ``ct-lungs``
model (both lungs as one label: the network learns "lung", the classic model's right/left split
is a rule about the midline, not something worth learning). The inputs go through exactly the
pre-processing of the model card (MONAI Orientation RAS, Spacing 4 mm, HU window), so training
and serving see the same tensors.

Held-out evaluation: phantoms from other seeds, generated at a finer, clinical grid
(0.8 mm pixels, 2.5 mm slices), run through the whole serving path (pre-processing, sliding
window, resampling back to the source grid, post-processing) with the TorchScript model in
process; Dice against the classic model's lungs on the source grid. The card records it.

Writes ``inference/model_repository/ct-lungs-unet/1/model.pt`` (TorchScript) and the model
card ``config/models/ct-lungs-unet.yaml``.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from inference.algorithms import segment_lungs
from inference.cards import ModelCard
from inference.runner import preprocess, run_model, torchscript_predictor
from inference.training.phantoms import axial_affine, random_chest_phantom, skull_phantom

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY_ENTRY = ROOT / "inference" / "model_repository" / "ct-lungs-unet"
CARD_PATH = ROOT / "config" / "models" / "ct-lungs-unet.yaml"
PATCH = (64, 64, 64)
NETWORK: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
    "norm": "batch",
}

CARD: dict[str, Any] = {
    "name": "ct-lungs-unet",
    "version": "1.0.0",
    "triton_model": "ct-lungs-unet",
    "modality": "CT",
    "task": "segmentation",
    "description": (
        "Lungs (both, one label) on CT by a small MONAI 3D UNet on 4 mm voxels, sliding window "
        "of 64^3 patches. Trained by inference/training/lungnet.py on synthetic phantoms only; "
        "not validated on patient data."
    ),
    "input": {
        "kind": "tensor",
        "mode": "patch",
        "tensor": "INPUT__0",
        "output_tensor": "OUTPUT__0",
        "channels": 1,
        "dtype": "FP32",
        "output_channels": 2,
        "patch_size": list(PATCH),
        "overlap": 0.25,
        "batch_size": 4,
    },
    "preprocessing": {
        "orientation": "RAS",
        "spacing": [4.0, 4.0, 4.0],
        "intensity": {"a_min": -1000, "a_max": 500, "b_min": 0.0, "b_max": 1.0, "clip": True},
    },
    "postprocessing": {
        "activation": "softmax",
        "min_component_ml": 100.0,
        "fill_holes": True,
    },
    "labels": [
        {
            "value": 1,
            "name": "Lungs",
            "category": {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"},
            "type": {"scheme": "SCT", "value": "39607008", "meaning": "Lung structure"},
            "color": [120, 200, 255],
            "rt_roi_type": "ORGAN",
        }
    ],
    "outputs": ["SEG", "SR", "RTSTRUCT", "PROBABILITY_MAP"],
}


def card_model() -> ModelCard:
    """The card of ct-lungs-unet as the training writes it (without training figures)."""
    return ModelCard.model_validate(CARD)


def network() -> Any:
    """A fresh MONAI UNet of the shape ct-lungs-unet uses."""
    from monai.networks.nets import UNet

    return UNet(**NETWORK)


def _on_grid(
    card: ModelCard, hu: np.ndarray, affine: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    image, _ = preprocess(card, hu, affine)
    no_window = card.model_copy(
        update={"preprocessing": card.preprocessing.model_copy(update={"intensity": None})}
    )
    label, _ = preprocess(no_window, mask.astype(np.int16) * 100, affine)
    return image[0], (label[0] > 50).astype(np.int64)


def training_set(
    card: ModelCard, rng: np.random.Generator, chests: int, skulls: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Phantoms and their labels (from ct-lungs), pre-processed as the card says."""
    data = []
    for _ in range(chests):
        p = random_chest_phantom(rng, slices=int(rng.integers(48, 80)))
        data.append(_on_grid(card, p.hu, p.affine, segment_lungs(p.hu, p.affine) > 0))
    for _ in range(skulls):
        affine = axial_affine(40, 128, 2.0, 5.0)
        hu = skull_phantom(rng)
        data.append(_on_grid(card, hu, affine, segment_lungs(hu, affine) > 0))
    return data


def _crop(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    pad = [(0, max(0, p - s)) for p, s in zip(PATCH, image.shape, strict=True)]
    image = np.pad(image, pad, mode="edge")
    label = np.pad(label, pad)
    if label.any() and rng.random() < 0.67:
        fg = np.argwhere(label)
        centre = fg[rng.integers(len(fg))]
    else:
        centre = np.array([rng.integers(s) for s in image.shape])
    start = [
        int(np.clip(c - p // 2, 0, s - p))
        for c, p, s in zip(centre, PATCH, image.shape, strict=True)
    ]
    sl = tuple(slice(a, a + p) for a, p in zip(start, PATCH, strict=True))
    return image[sl], label[sl]


def train(iterations: int, seed: int, batch: int = 4) -> tuple[Any, dict[str, Any]]:
    """Train the network from ``seed`` for ``iterations`` steps; returns it and its record."""
    import torch
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    card = card_model()
    t0 = time.perf_counter()
    data = training_set(card, rng, chests=32, skulls=8)
    print(f"training set: {len(data)} volumes in {time.perf_counter() - t0:.1f} s", flush=True)
    net = network()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
    net.train()
    t0 = time.perf_counter()
    for it in range(iterations):
        crops = [_crop(*data[int(rng.integers(len(data)))], rng) for _ in range(batch)]
        x = torch.from_numpy(np.stack([c[0] for c in crops])[:, None])
        y = torch.from_numpy(np.stack([c[1] for c in crops])[:, None])
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iterations - 1:
            print(f"it {it} loss {loss.item():.4f} {time.perf_counter() - t0:.0f} s", flush=True)
    net.eval()
    info = {
        "iterations": iterations,
        "batch": batch,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - t0),
    }
    return net, info


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def held_out_phantom(seed: int) -> Any:
    """A held-out chest phantom on a clinical grid (never seen in training)."""
    return random_chest_phantom(
        np.random.default_rng(seed), slices=120, size=400, pixel_mm=0.8, slice_mm=2.5
    )


def evaluate(module: Any, seeds: list[int]) -> list[float]:
    """Dice against ct-lungs on the held-out phantoms of ``seeds``, through the node's runner."""
    card = card_model()
    predict = torchscript_predictor(module)
    scores = []
    for seed in seeds:
        p = held_out_phantom(seed)
        reference = segment_lungs(p.hu, p.affine) > 0
        out = run_model(card, p.hu, p.affine, predict=predict)
        assert out.labels is not None
        scores.append(dice(out.labels == 1, reference))
        print(f"held-out seed {seed}: Dice {scores[-1]:.4f}", flush=True)
    return scores


HELD_OUT_SEEDS = [90001, 90002, 90003]


def main() -> None:
    """``python -m inference.training.lungnet``: train, evaluate, write the weights and the card."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    net, info = train(args.iterations, args.seed)
    scripted = torch.jit.script(net)
    target = REPOSITORY_ENTRY / "1" / "model.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(target))
    module = torch.jit.load(str(target))
    scores = evaluate(module, HELD_OUT_SEEDS)
    card = dict(CARD)
    card["training"] = {
        "script": "inference/training/lungnet.py",
        "data": (
            "32 randomised chest phantoms and 8 skull phantoms (inference/training/phantoms.py), "
            "labels from the classic ct-lungs model (right and left merged); no patient data"
        ),
        "network": f"monai.networks.nets.UNet {NETWORK}",
        **info,
        "weights_sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "held_out": (
            f"{len(HELD_OUT_SEEDS)} chest phantoms, seeds {HELD_OUT_SEEDS}, 0.8 mm pixels, "
            "2.5 mm slices, full serving path"
        ),
        "dice_vs_ct_lungs": [round(s, 4) for s in scores],
        "dice_vs_ct_lungs_min": round(min(scores), 4),
    }
    header = (
        "# Model card: written by inference/training/lungnet.py (edit the script, not this file).\n"
    )
    CARD_PATH.write_text(header + yaml.safe_dump(card, sort_keys=False, width=100))
    print(f"wrote {target} ({target.stat().st_size} bytes) and {CARD_PATH}")


if __name__ == "__main__":
    main()
