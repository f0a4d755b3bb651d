"""``airouter models list | import | export-repository``."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from airouter.core.settings import Settings, load_settings
from airouter.core.vocab import TritonProtocol
from inference.cards import ModelCard, ModelCardError, load_cards
from inference.triton import MODEL_REPOSITORY

# the state of a card no rule in force runs: the node's server has not loaded it
# (inference.load_models: in_use); a job that needs it has it loaded
NOT_LOADED = "not loaded (no rule uses it)"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, **({"data_dir": args.data_dir} if args.data_dir else {}))


def _readiness(
    args: argparse.Namespace, settings: Settings, cards: dict[str, ModelCard]
) -> dict[str, str]:
    """Card name -> state, from a Triton server (--triton-url, which knows Triton model
    names) or else from the running node (which reports by card name)."""
    models = list(cards)
    if args.triton_url:
        from inference.triton import InferenceClient

        client = InferenceClient(args.triton_url, TritonProtocol(args.protocol), 10.0)
        if not client.is_ready():
            return {m: "server not ready" for m in models}
        try:
            states = client.loaded_models()
        finally:
            client.close()
        return {m: states.get(c.triton_model, "not in repository") for m, c in cards.items()}
    url = f"http://{settings.http.host}:{settings.http.port}/api/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            health = json.load(response)
    except (urllib.error.URLError, OSError):
        return {m: "node not running" for m in models}
    ready = health.get("models_ready", {})
    in_use = set(health.get("models_in_use", models))
    return {
        m: "READY" if ready.get(m) else "not ready" if m in in_use else NOT_LOADED for m in models
    }


def list_models(args: argparse.Namespace) -> int:
    """``airouter models list``: each card, its version, checksum and readiness on Triton."""
    settings = _settings(args)
    try:
        cards = load_cards(*settings.inference.card_dirs(settings.data_dir))
    except ModelCardError as exc:
        print(f"airouter: {exc}", file=sys.stderr)
        return 1
    states = _readiness(args, settings, cards)
    rows: list[dict[str, Any]] = [
        {
            "name": c.name,
            "version": c.version,
            "card": c.checksum[:12],
            "triton_model": c.triton_model,
            "task": c.task.value,
            "input": f"{c.input.kind.value}/{c.input.mode.value}",
            "labels": [label.name for label in c.labels],
            "state": states[c.name],
        }
        for c in cards.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'MODEL':<20} {'VERSION':<9} {'CARD':<13} {'INPUT':<18} {'STATE':<18} LABELS")
    for r in rows:
        print(
            f"{r['name']:<20} {r['version']:<9} {r['card']:<13} {r['input']:<18} "
            f"{r['state']:<18} {', '.join(r['labels'])}"
        )
    return 0


def import_model(args: argparse.Namespace) -> int:
    """``airouter models import``: a MONAI bundle becomes a model card and a Triton entry."""
    from inference.bundles import BundleError, import_bundle

    settings = _settings(args)
    codes = yaml.safe_load(args.codes.read_text()) if args.codes else None
    try:
        card, entry = import_bundle(
            args.bundle,
            settings.inference.imported_models(settings.data_dir) / "cards",
            settings.inference.imported_models(settings.data_dir) / "repository",
            name=args.name,
            codes=codes,
            replace=args.replace,
        )
    except (BundleError, ModelCardError) as exc:
        print(f"airouter: cannot import {args.bundle}: {exc}", file=sys.stderr)
        return 1
    print(f"model card: {card}\nTriton entry: {entry}\n(restart the node to serve it)")
    return 0


def export_repository(args: argparse.Namespace) -> int:
    """``airouter models export-repository``: the Triton repository an NGC Triton serves."""
    from inference.bundles import BundleError, export_repository

    settings = _settings(args)
    try:
        cards = load_cards(*settings.inference.card_dirs(settings.data_dir))
        imported = settings.inference.imported_models(settings.data_dir) / "repository"
        repositories = [MODEL_REPOSITORY, imported]
        written = export_repository(cards, repositories, args.dir, args.backend)
    except (BundleError, ModelCardError) as exc:
        print(f"airouter: {exc}", file=sys.stderr)
        return 1
    print(f"{args.dir}: {', '.join(written)} ({args.backend} backend for TorchScript models)")
    return 0


def add_parser(sub: Any) -> None:
    """Add ``airouter models ...`` to the command's sub-parsers."""
    models = sub.add_parser("models", help="model cards and the Triton model repository")
    msub = models.add_subparsers(dest="models_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="YAML settings file (AIROUTER_CONFIG)")
        p.add_argument("--data-dir", type=Path, help="the node's data directory")

    ls = msub.add_parser("list", help="each model, its version, and whether Triton has it ready")
    common(ls)
    ls.add_argument("--triton-url", help="ask this Triton (host:port) instead of the node")
    ls.add_argument("--protocol", choices=[p.value for p in TritonProtocol], default="http")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=list_models)

    imp = msub.add_parser("import", help="a MONAI bundle -> model card + Triton entry")
    common(imp)
    imp.add_argument("bundle", type=Path, help="bundle folder (configs/metadata.json, models/)")
    imp.add_argument("--name", help="model name (default: the bundle's name)")
    imp.add_argument("--codes", type=Path, help="YAML: label name -> coded concepts and colour")
    imp.add_argument("--replace", action="store_true", help="replace an imported model")
    imp.set_defaults(func=import_model)

    exp = msub.add_parser("export-repository", help="write the Triton repository for NGC Triton")
    common(exp)
    exp.add_argument("dir", type=Path)
    exp.add_argument("--backend", choices=["python", "libtorch"], default="python")
    exp.set_defaults(func=export_repository)
