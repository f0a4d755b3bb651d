"""Inference speed on the 140-slice CT: where the time goes, per transport.

For each bundled model and each transport (HTTP, gRPC, each with and without system shared
memory) against the real tritonserver: pre-processing (MONAI, in the node), the Triton requests
split into server time (Triton's own statistics: queue + compute, including the copy into the
Python backend) and transfer (the rest of the client's wall time: serialisation, the socket or
the shared-memory copy, deserialisation), and post-processing (resampling back, cleaning).
The network model is also run in process with the same TorchScript file: the overhead ratio is
Triton's total over that. Medians of --rounds, transports alternating within each round.

    .venv/bin/python -m bench.inference [--rounds 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.common import machine, median, record
from inference.cards import ModelCard, load_cards
from inference.runner import run_model, timed_in_process
from inference.training.phantoms import random_chest_phantom
from inference.triton import InferenceClient, LocalTriton
from inference.volume import build_volume
from tests.peers import ROOT, head_ct_files

TRANSPORTS = [("http", False), ("grpc", False), ("http", True), ("grpc", True)]


class TimedClient(InferenceClient):
    """Adds up the client's wall time per request and the server's time for the same requests."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wall = 0.0
        self.requests = 0

    def infer(self, model: str, inputs: Any, outputs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return super().infer(model, inputs, outputs)
        finally:
            self.wall += time.perf_counter() - t0
            self.requests += 1


def run_once(card: ModelCard, volume: Any, client: TimedClient) -> dict[str, float]:
    before = client.statistics(card.triton_model)
    client.wall, client.requests = 0.0, 0
    t0 = time.perf_counter()
    out = run_model(card, volume.hu, volume.affine, client=client)
    total = time.perf_counter() - t0
    after = client.statistics(card.triton_model)
    server = after["success"] - before["success"]
    compute = sum(
        after[k] - before[k] for k in ("compute_input", "compute_infer", "compute_output")
    )
    return {
        "pre": out.timings.get("preprocess_s", 0.0),
        "transfer": client.wall - server,
        "server": server,
        "compute": compute,
        "post": out.timings.get("postprocess_s", 0.0),
        "total": total,
        "requests": client.requests,
    }


def in_process(card: ModelCard, volume: Any, device: str) -> dict[str, float]:
    import torch

    entry = ROOT / "inference" / "model_repository" / card.triton_model / "1" / "model.pt"
    module = torch.jit.load(str(entry), map_location=device).eval()
    return timed_in_process(card, volume.hu, volume.affine, module, device)[1]


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    t0 = time.perf_counter()
    volume = build_volume(head_ct_files())
    build_s = time.perf_counter() - t0
    cards = load_cards(ROOT / "config" / "models")
    chest = random_chest_phantom(
        np.random.default_rng(90004), slices=140, size=512, pixel_mm=0.7, slice_mm=2.5
    )
    volumes = {
        "head CT": volume,
        "chest phantom": SimpleNamespace(hu=chest.hu, affine=chest.affine),
    }
    cases = [
        ("ct-body", "head CT"),
        ("ct-lungs-unet", "head CT"),
        ("ct-lungs-unet", "chest phantom"),
    ]
    server = LocalTriton(Path(tempfile.mkdtemp(prefix="bench-triton-")))
    server.start()
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    baseline: dict[str, list[dict[str, float]]] = {}
    try:
        InferenceClient(server.url("http")).wait_ready(
            [c.triton_model for c in cards.values()], 180
        )
        clients = {
            (p, shm): TimedClient(server.url(p), p, shared_memory=shm) for p, shm in TRANSPORTS
        }
        for name in ("ct-body", "ct-lungs-unet"):  # warm each model and the imports once
            run_once(cards[name], volume, clients[("http", False)])
        for r in range(args.rounds):
            for name, case in cases:
                for (protocol, shm), client in clients.items():
                    label = f"{protocol}{' + shared memory' if shm else ''}"
                    results.setdefault((name, case, label), []).append(
                        run_once(cards[name], volumes[case], client)
                    )
            for case in volumes:
                baseline.setdefault(case, []).append(
                    in_process(cards["ct-lungs-unet"], volumes[case], args.device)
                )
            print(f"round {r + 1} done", flush=True)
        for client in clients.values():
            client.close()
    finally:
        server.stop()

    def fmt(v: float) -> str:
        return f"{v:.3f}"

    shape = "x".join(str(n) for n in volume.hu.shape)
    lines = [
        f"`bench/inference.py`: the shared head CT ({shape}, int16), {args.rounds} rounds, "
        f"medians; tritonserver 2.51 from nvidia-pytriton on the CPU, Python backend, "
        f"client and server on one host. Volume build (read, sort, decode, rescale): "
        f"**{build_s:.2f} s**.",
        "",
        "The chest phantom is generated by `inference/training/phantoms.py` (140x512x512, 0.7 mm "
        "pixels, 2.5 mm slices): 8 patches of 64^3 in 2 requests, against 1 patch for the "
        "head. Transfer is the client wall time minus the server time of the same requests: "
        "within +-0.01 s it is noise (it can come out negative).",
        "",
        "| model | volume | transport | pre-processing s | transfer s | server s (compute) | "
        "post-processing s | total s | requests |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (name, case, label), rows in results.items():
        m = {k: median([row[k] for row in rows]) for k in rows[0]}
        lines.append(
            f"| {name} | {case} | {label} | {fmt(m['pre'])} | **{fmt(m['transfer'])}** | "
            f"{fmt(m['server'])} ({fmt(m['compute'])}) | {fmt(m['post'])} | {fmt(m['total'])} | "
            f"{int(m['requests'])} |"
        )
    lines.append("")
    for case, rows in baseline.items():
        b = {k: median([row[k] for row in rows]) for k in rows[0]}
        triton = {
            label: median([row["total"] for row in r])
            for (name, c, label), r in results.items()
            if name == "ct-lungs-unet" and c == case
        }
        best = min(triton, key=lambda k: triton[k])
        lines.append(
            f"- ct-lungs-unet on the {case} in process ({args.device}, the same TorchScript "
            f"file and MONAI code): pre-processing {fmt(b['pre'])} s, compute "
            f"{fmt(b['compute'])} s, post-processing {fmt(b['post'])} s, total "
            f"{fmt(b['total'])} s. Through Triton: **{triton[best] / b['total']:.2f}x** that "
            f"with {best}, {triton['http'] / b['total']:.2f}x over plain HTTP."
        )
    lines += [
        "",
        f"Machine: {machine()}.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        record("Inference: the 140-slice CT through Triton, per transport", body)


if __name__ == "__main__":
    main()
