"""MONAI bundles -> model cards and Triton model-repository entries; repository export.

A MONAI bundle (https://docs.monai.io/en/stable/mb_specification.html) is a folder with
``configs/metadata.json`` (what the network takes and gives), ``configs/inference.json`` or
``.yaml`` (network definition, pre-processing, inferer, post-processing) and ``models/model.ts``
(TorchScript) or ``models/model.pt`` (a state dict for ``network_def``). Users bring bundles on
their own disks: nothing here downloads anything.

The import reads what the node needs from the bundle's configuration (Orientationd, Spacingd,
ScaleIntensityRanged, the inferer's ROI, batch and overlap, the activation) and refuses, with a
reason, what it cannot express, rather than serving a model with different pre-processing
from the one it was trained with.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from airouter.core.vocab import Activation
from inference.cards import ModelCard, ModelCardError
from inference.serving.torchscript import MODEL_PY, config_pbtxt

ANATOMY = {"scheme": "SCT", "value": "91723000", "meaning": "Anatomical Structure"}
ALTERED = {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Altered Structure"}

# Label names of common bundles -> SNOMED CT (CID 7150 category / CID 7151 type) and RT type.
KNOWN_LABELS: dict[str, tuple[dict[str, str], str, str, str]] = {
    "lung": (ANATOMY, "39607008", "Lung structure", "ORGAN"),
    "lungs": (ANATOMY, "39607008", "Lung structure", "ORGAN"),
    "right lung": (ANATOMY, "3341006", "Right lung", "ORGAN"),
    "left lung": (ANATOMY, "44029006", "Left lung", "ORGAN"),
    "liver": (ANATOMY, "10200004", "Liver structure", "ORGAN"),
    "spleen": (ANATOMY, "78961009", "Splenic structure", "ORGAN"),
    "kidney": (ANATOMY, "64033007", "Kidney structure", "ORGAN"),
    "right kidney": (ANATOMY, "9846003", "Right kidney structure", "ORGAN"),
    "left kidney": (ANATOMY, "18639004", "Left kidney structure", "ORGAN"),
    "heart": (ANATOMY, "80891009", "Heart structure", "ORGAN"),
    "pancreas": (ANATOMY, "15776009", "Pancreatic structure", "ORGAN"),
    "brain": (ANATOMY, "12738006", "Brain structure", "ORGAN"),
    "aorta": (ANATOMY, "15825003", "Aortic structure", "ORGAN"),
    "stomach": (ANATOMY, "69695003", "Stomach structure", "ORGAN"),
    "esophagus": (ANATOMY, "32849002", "Esophageal structure", "AVOIDANCE"),
    "spinal cord": (ANATOMY, "2748008", "Spinal cord structure", "AVOIDANCE"),
    "bladder": (ANATOMY, "89837001", "Urinary bladder structure", "ORGAN"),
    "prostate": (ANATOMY, "41216001", "Prostatic structure", "ORGAN"),
    "body": (ANATOMY, "38266002", "Entire body", "EXTERNAL"),
    "tumor": (ALTERED, "108369006", "Neoplasm", "GTV"),
    "tumour": (ALTERED, "108369006", "Neoplasm", "GTV"),
}
PALETTE = [(255, 80, 80), (80, 200, 120), (80, 140, 255), (255, 200, 60), (200, 100, 255)]


class BundleError(ModelCardError):
    """The bundle cannot be imported; the message says what is missing or unsupported."""


def _read_config(path: Path) -> dict[str, Any]:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        f = path / "configs" / name
        if f.exists():
            text = f.read_text()
            data = json.loads(text) if f.suffix == ".json" else yaml.safe_load(text)
            if not isinstance(data, dict):
                raise BundleError(f"{f}: not a mapping")
            return data
    raise BundleError(f"{path}/configs: no inference.json or inference.yaml")


def _targets(node: Any) -> list[dict[str, Any]]:
    """Every ``{"_target_": ...}`` component in a bundle config, depth first."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append(node)
        for value in node.values():
            found.extend(_targets(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_targets(value))
    return found


def _short(target: str) -> str:
    return str(target).split("#")[-1].split(".")[-1]


def _literal(component: dict[str, Any], key: str, default: Any = None) -> Any:
    value = component.get(key, default)
    if isinstance(value, str) and value[:1] in ("@", "$", "%"):
        raise BundleError(
            f"{_short(component['_target_'])}.{key} is an expression ({value}); "
            "the import needs literal values"
        )
    return value


def _transforms(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Activation]:
    """From the inference config: the pre-processing a card states, the inferer, the
    activation (``none`` when the config names none)."""
    pre: dict[str, Any] = {}
    inferer: dict[str, Any] | None = None
    activation = Activation.NONE
    for c in _targets(config):
        kind = _short(c["_target_"])
        if kind in ("Orientationd", "Orientation"):
            pre["orientation"] = _literal(c, "axcodes")
        elif kind in ("Spacingd", "Spacing"):
            pre["spacing"] = [float(v) for v in _literal(c, "pixdim")]
        elif kind in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            defaults = (("a_min", None), ("a_max", None), ("b_min", 0.0), ("b_max", 1.0))
            pre["intensity"] = {k: _literal(c, k, d) for k, d in (*defaults, ("clip", False))}
        elif kind in ("SlidingWindowInferer", "SimpleInferer"):
            inferer = c
        elif kind in ("Activationsd", "Activations"):
            if _literal(c, "softmax", False):
                activation = Activation.SOFTMAX
            elif _literal(c, "sigmoid", False):
                activation = Activation.SIGMOID
    if inferer is None:
        raise BundleError("inference config: no SlidingWindowInferer or SimpleInferer")
    return pre, inferer, activation


def _model_input(
    in_fmt: dict[str, Any], out_fmt: dict[str, Any], inferer: dict[str, Any]
) -> dict[str, Any]:
    """The card's ``input``: tensor names, channels, and patch or whole-volume mode."""
    spatial = len(in_fmt.get("spatial_shape", [0, 0, 0]))
    if spatial != 3:
        raise BundleError(f"only 3D networks are imported ({spatial} spatial dimensions)")
    model_input: dict[str, Any] = {
        "kind": "tensor",
        "tensor": "INPUT__0",
        "output_tensor": "OUTPUT__0",
        "channels": int(in_fmt.get("num_channels", 1)),
        "dtype": "FP32",
        "output_channels": int(out_fmt.get("num_channels", 1)),
    }
    if _short(inferer["_target_"]) == "SlidingWindowInferer":
        model_input.update(
            mode="patch",
            patch_size=[int(v) for v in _literal(inferer, "roi_size")],
            overlap=float(_literal(inferer, "overlap", 0.25)),
            batch_size=int(_literal(inferer, "sw_batch_size", 1)),
        )
    else:
        model_input.update(mode="volume", divisible_by=16)
    if model_input["channels"] != 1:
        raise BundleError("only single-channel inputs are imported")
    return model_input


def _labels(
    out_fmt: dict[str, Any], activation: Activation, codes: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The card's labels from the output's ``channel_def``: codes from ``codes`` or the
    known ones; a label with neither is refused, naming it."""
    channel_def = {int(k): str(v) for k, v in out_fmt.get("channel_def", {}).items()}
    labels = []
    known = {k.lower(): v for k, v in (codes or {}).items()}
    unknown = []
    for channel, label_name in sorted(channel_def.items()):
        if activation is Activation.SOFTMAX and channel == 0:
            continue  # background
        value = channel if activation is Activation.SOFTMAX else channel + 1
        key = label_name.lower().replace("_", " ")
        if key in known:
            entry = dict(known[key])
        elif key in KNOWN_LABELS:
            category, code, meaning, rt_type = KNOWN_LABELS[key]
            entry = {
                "category": category,
                "type": {"scheme": "SCT", "value": code, "meaning": meaning},
                "rt_roi_type": rt_type,
            }
        else:
            unknown.append(label_name)
            continue
        entry.setdefault("color", list(PALETTE[(value - 1) % len(PALETTE)]))
        labels.append({"value": value, "name": label_name.title()[:64], **entry})
    if unknown:
        raise BundleError(
            f"no coded concept for label(s) {', '.join(unknown)}: give them with --codes "
            "(YAML: name: {category: {scheme, value, meaning}, type: {...}, rt_roi_type})"
        )
    if not labels:
        raise BundleError("metadata.json: the output's channel_def names no label")
    return labels


def card_from_bundle(
    bundle: Path, name: str | None = None, codes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The model card (as a mapping) for a bundle."""
    meta_path = bundle / "configs" / "metadata.json"
    if not meta_path.exists():
        raise BundleError(f"{bundle}: no configs/metadata.json")
    meta = json.loads(meta_path.read_text())
    fmt = meta.get("network_data_format", {})
    inputs, outputs = fmt.get("inputs", {}), fmt.get("outputs", {})
    if len(inputs) != 1 or len(outputs) != 1:
        raise BundleError("network_data_format: one input and one output are supported")
    (in_fmt,) = inputs.values()
    (out_fmt,) = outputs.values()
    model_name = name or re.sub(r"[^A-Za-z0-9_.-]+", "-", str(meta.get("name", bundle.name)))
    model_name = model_name.strip("-").lower()[:64] or bundle.name
    pre, inferer, activation = _transforms(_read_config(bundle))
    model_input = _model_input(in_fmt, out_fmt, inferer)
    if activation is Activation.NONE:
        multi = model_input["output_channels"] > 1
        activation = Activation.SOFTMAX if multi else Activation.SIGMOID
    card: dict[str, Any] = {
        "name": model_name,
        "version": str(meta.get("version", "0")),
        "triton_model": model_name,
        "modality": str(in_fmt.get("modality", "CT")),
        "task": "segmentation",
        "description": str(meta.get("description", ""))[:1000],
        "input": model_input,
        "preprocessing": pre,
        "postprocessing": {"activation": activation.value, "min_component_ml": 1.0},
        "labels": _labels(out_fmt, activation, codes),
        "outputs": ["SEG", "SR", "RTSTRUCT", "PROBABILITY_MAP"],
        "training": {
            "source": f"MONAI bundle {meta.get('name', bundle.name)} {meta.get('version', '')}",
            "authors": meta.get("authors", ""),
            "references": meta.get("references", []),
            "data": meta.get("data_source", ""),
        },
    }
    ModelCard.model_validate(card)  # raises with the field that is wrong
    return card


def torchscript_from_bundle(bundle: Path, config: dict[str, Any], target: Path) -> None:
    """``models/model.ts`` as is, or ``network_def`` + ``models/model.pt`` scripted."""
    import torch

    ts = bundle / "models" / "model.ts"
    if ts.exists():
        torch.jit.load(str(ts))  # it must load here, not only in Triton
        shutil.copyfile(ts, target)
        return
    weights = bundle / "models" / "model.pt"
    if not weights.exists():
        raise BundleError(f"{bundle}/models: neither model.ts nor model.pt")
    if "network_def" not in config:
        raise BundleError("inference config: model.pt needs a network_def")
    from monai.bundle import ConfigParser

    parser = ConfigParser(config)
    network = parser.get_parsed_content("network_def")
    state = torch.load(str(weights), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    network.load_state_dict(state)
    network.eval()
    torch.jit.script(network).save(str(target))


def import_bundle(
    bundle: Path,
    cards_dir: Path,
    repository: Path,
    name: str | None = None,
    codes: dict[str, Any] | None = None,
    replace: bool = False,
) -> tuple[Path, Path]:
    """Write the card to ``cards_dir/<name>.yaml`` and the entry to ``repository/<name>``."""
    card = card_from_bundle(bundle, name, codes)
    model = card["name"]
    card_path = cards_dir / f"{model}.yaml"
    entry = repository / model
    if not replace and (card_path.exists() or entry.exists()):
        raise BundleError(f"model {model} is already imported (use --replace)")
    staging = repository / f".{model}.importing"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "1").mkdir(parents=True)
    torchscript_from_bundle(bundle, _read_config(bundle), staging / "1" / "model.pt")
    (staging / "1" / "model.py").write_text(MODEL_PY)
    (staging / "config.pbtxt").write_text(
        config_pbtxt(model, 1, card["input"]["output_channels"], 3)
    )
    shutil.rmtree(entry, ignore_errors=True)
    staging.rename(entry)
    cards_dir.mkdir(parents=True, exist_ok=True)
    header = f"# Model card imported from the MONAI bundle {bundle.resolve()}\n"
    card_path.write_text(header + yaml.safe_dump(card, sort_keys=False, width=100))
    return card_path, entry


def export_repository(
    cards: dict[str, ModelCard], repositories: list[Path], target: Path, backend: str = "python"
) -> list[str]:
    """Write the Triton model repository serving ``cards`` to ``target`` (for the NGC Triton
    container). ``backend="libtorch"`` turns TorchScript models into ``pytorch_libtorch``
    entries (no Python in the server for them); classic models stay on the Python backend."""
    written = []
    target.mkdir(parents=True, exist_ok=True)
    for card in sorted(cards.values(), key=lambda c: c.name):
        source = next(
            (r / card.triton_model for r in repositories if (r / card.triton_model).is_dir()), None
        )
        if source is None:
            raise BundleError(
                f"model {card.name}: no entry {card.triton_model} in the repositories"
            )
        dest = target / card.triton_model
        shutil.rmtree(dest, ignore_errors=True)
        torchscript = (source / "1" / "model.pt").exists()
        if backend == "libtorch" and torchscript:
            (dest / "1").mkdir(parents=True)
            shutil.copyfile(source / "1" / "model.pt", dest / "1" / "model.pt")
            (dest / "config.pbtxt").write_text(
                config_pbtxt(
                    card.triton_model,
                    card.input.channels,
                    card.input.output_channels,
                    3,
                    backend="libtorch",
                )
            )
        else:
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
        written.append(card.triton_model)
    return written
