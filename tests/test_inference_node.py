"""Inference through the running node: Triton going away and coming back, the node's own
Triton restarted when it dies, and a MONAI bundle imported and run end to end to a SEG."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
import torch
import yaml

from airouter.app.models_cli import NOT_LOADED
from airouter.jobs.artefacts import load_masks
from inference.triton import InferenceClient, LocalTriton
from tests.peers import ROOT, NodeProcess, start_node, stop_process, storescu, wait_for
from tests.phantoms import chest_phantom, random_chest_phantom, write_ct_series
from tests.raster import dice

pytestmark = pytest.mark.integration


def _rules(directory: Path, models: list[str], **extra: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rule = {
        "name": "segment-ct",
        "match": {"Modality": "CT"},
        "select": {"orientation": "axial", "min_instances": 5},
        "models": models,
        "outputs": ["SEG"],
        **extra,
    }
    (directory / "segment.yaml").write_text(yaml.safe_dump({"rules": [rule]}))
    return directory


def _jobs(node: NodeProcess) -> list[dict[str, Any]]:
    return list(node.get("/api/jobs") or [])


def _send_phantom(node: NodeProcess, out: Path, seed: int) -> str:
    p = chest_phantom(slices=24, size=96)
    p.hu[:, :, : seed % 5] = -1000  # studies differ a little
    study, files = write_ct_series(p.hu, p.affine, out, patient_id=f"P{seed}")
    result = storescu(node.dimse_port, files)
    assert result.returncode == 0, result.stderr
    return study


def test_triton_stopped_in_the_middle_of_a_queue_every_job_completes(tmp_path: Path) -> None:
    triton = LocalTriton(tmp_path / "triton")
    triton.start()
    node = None
    try:
        InferenceClient(triton.url("http")).wait_ready(["ct-body"], 120)
        node = start_node(
            tmp_path / "node",
            None,
            inference={"triton_url": triton.url("http"), "retry_max_s": 1.0},
            router={
                "rules_dir": str(_rules(tmp_path / "rules", ["ct-body"])),
                "quiet_period_s": 0.5,
            },
        )
        first = _send_phantom(node, tmp_path / "s0", 0)
        wait_for(
            lambda: any(j["study_uid"] == first and j["state"] == "done" for j in _jobs(node)),
            60,
            "the first job",
        )
        triton.process.kill()  # type: ignore[union-attr]  # a crash, not a polite stop
        triton.process.wait()  # type: ignore[union-attr]
        studies = [_send_phantom(node, tmp_path / f"s{n}", n) for n in range(1, 4)]
        wait_for(
            lambda: any(j["state"] == "waiting_inference" for j in _jobs(node)),
            60,
            "a job waiting for inference",
        )
        time.sleep(3)  # a few retries while the server is down
        jobs = _jobs(node)
        assert not [j for j in jobs if j["state"] == "failed"]
        waiting = [j for j in jobs if j["state"] == "waiting_inference"]
        assert len(waiting) == 1 and "Triton" in (waiting[0]["error"] or "")
        assert {j["state"] for j in jobs if j["study_uid"] in studies} <= {
            "queued",
            "waiting_inference",
        }
        triton.start()  # same ports
        wait_for(lambda: sum(j["state"] == "done" for j in _jobs(node)) == 4, 120, "every job done")
        jobs = _jobs(node)
        assert all(j["state"] == "done" and not j["error"] for j in jobs)
        assert all(any(o["kind"] == "SEG" for o in j["outputs"]) for j in jobs)
        kinds = [e["kind"] for e in node.get("/api/events")]
        assert "job_waiting_inference" in kinds and "job_inference_resumed" in kinds
    finally:
        if node is not None:
            stop_process(node.process)
        triton.stop()


def _stubs(pid: int) -> list[str]:
    """The models whose Python backend stub runs under tritonserver ``pid``."""
    models = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            parent = int((cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and args[0].endswith(b"triton_python_backend_stub"):
            models.append(Path(args[1].decode()).parent.parent.name)  # <repo>/<model>/1/model.py
    return sorted(models)


def test_the_node_loads_the_models_its_rules_run_and_more_when_a_rule_names_them(
    tmp_path: Path,
) -> None:
    """``inference.load_models: in_use`` (the default): with a rule that runs ct-body, the
    node's tritonserver runs ct-body alone (one Python backend stub, not one per model of the
    repository), the health says which models the rules run, ``airouter models list`` says
    the others are not loaded; a rule file edited to run ct-lungs too has it loaded by the
    same server (no restart) and its job runs both."""
    rules = _rules(tmp_path / "rules", ["ct-body"])
    node = start_node(
        tmp_path / "node", None, router={"rules_dir": str(rules), "quiet_period_s": 0.5}
    )
    try:
        health = node.get("/api/health")
        pid = health["triton_pid"]
        assert health["models_in_use"] == ["ct-body"]
        assert health["models_ready"]["ct-body"] and not health["models_ready"]["ct-lungs"]
        assert _stubs(pid) == ["ct-body"]
        config = str(tmp_path / "node" / "airouter.yaml")
        listing = _cli("models", "list", "--config", config, "--json")
        assert listing.returncode == 0, listing.stderr
        states = {m["name"]: m["state"] for m in json.loads(listing.stdout)}
        assert states["ct-body"] == "READY"
        assert states["ct-lungs"] == states["ct-lungs-unet"] == NOT_LOADED

        time.sleep(1.1)  # a new modification time for the rule file
        _rules(rules, ["ct-body", "ct-lungs"])
        wait_for(
            lambda: node.get("/api/health")["models_ready"]["ct-lungs"], 120, "ct-lungs loaded"
        )
        health = node.get("/api/health")
        assert health["models_in_use"] == ["ct-body", "ct-lungs"]
        assert health["triton_pid"] == pid and _stubs(pid) == ["ct-body", "ct-lungs"]
        study = _send_phantom(node, tmp_path / "s", 3)
        job = wait_for(
            lambda: next(
                (j for j in _jobs(node) if j["study_uid"] == study and j["state"] == "done"), None
            ),
            120,
            "the job on both models",
        )
        assert job["models"] == ["ct-body", "ct-lungs"] and not job["error"]
    finally:
        stop_process(node.process)


def test_the_node_restarts_its_own_triton_when_it_dies(tmp_path: Path) -> None:
    node = start_node(
        tmp_path / "node",
        None,
        router={"rules_dir": str(_rules(tmp_path / "rules", ["ct-body"])), "quiet_period_s": 0.5},
    )
    try:
        pid = node.get("/api/health")["triton_pid"]
        os.kill(pid, signal.SIGKILL)

        def restarted() -> bool:
            health = node.get("/api/health")
            return bool(
                health["triton_pid"] != pid
                and health["triton_ready"]
                and health["models_in_use"] == ["ct-body"]
                and all(health["models_ready"][m] for m in health["models_in_use"])
            )

        wait_for(restarted, 120, "the node's Triton restarted")
        study = _send_phantom(node, tmp_path / "s", 1)
        wait_for(
            lambda: any(j["study_uid"] == study and j["state"] == "done" for j in _jobs(node)),
            60,
            "the job after the restart",
        )
        assert "triton_restarted" in [e["kind"] for e in node.get("/api/events")]
    finally:
        stop_process(node.process)


# -- a MONAI bundle, imported and run through the node --------------------------------------------
def make_bundle(directory: Path) -> Path:
    """A MONAI bundle as the Model Zoo ships them: metadata.json, inference.json with
    network_def, pre-processing, inferer and post-processing, and a state dict. The network is
    a MONAI UNet carrying the weights of the shipped ct-lungs-unet (trained in this repo)."""
    from inference.training.lungnet import NETWORK, network

    (directory / "configs").mkdir(parents=True)
    (directory / "models").mkdir()
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": "0.3.1",
        "name": "Phantom lung segmentation",
        "task": "Lung segmentation on CT",
        "description": "A test bundle: both lungs on CT.",
        "authors": "airouter tests",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": [64, 64, 64],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "spatial_shape": [64, 64, 64],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "background", "1": "lung"},
                }
            },
        },
    }
    inference = {
        "imports": ["$import torch"],
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "UNet", **NETWORK},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [4.0, 4.0, 4.0]},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -1000,
                    "a_max": 500,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [64, 64, 64],
            "sw_batch_size": 4,
            "overlap": 0.25,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            ],
        },
    }
    (directory / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    (directory / "configs" / "inference.json").write_text(json.dumps(inference, indent=2))
    shipped = torch.jit.load(str(ROOT / "inference/model_repository/ct-lungs-unet/1/model.pt"))
    net = network()
    net.load_state_dict(shipped.state_dict())
    torch.save(net.state_dict(), directory / "models" / "model.pt")
    return directory


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airouter.app.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_monai_bundle_imported_and_run_end_to_end_to_a_seg(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    data_dir = tmp_path / "node" / "var"
    result = _cli("models", "import", str(bundle), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    card = yaml.safe_load((data_dir / "models/cards/phantom-lung-segmentation.yaml").read_text())
    assert card["version"] == "0.3.1"
    assert card["input"]["patch_size"] == [64, 64, 64] and card["input"]["batch_size"] == 4
    assert card["preprocessing"]["spacing"] == [4.0, 4.0, 4.0]
    assert card["labels"][0]["type"]["value"] == "39607008"
    assert (data_dir / "models/repository/phantom-lung-segmentation/1/model.pt").exists()
    again = _cli("models", "import", str(bundle), "--data-dir", str(data_dir))
    assert again.returncode == 1 and "already imported" in again.stderr

    node = start_node(
        tmp_path / "node",
        None,
        router={
            "rules_dir": str(
                _rules(
                    tmp_path / "rules",
                    ["phantom-lung-segmentation"],
                    outputs=["SEG", "PROBABILITY_MAP"],
                    seg_type="labelmap",
                )
            ),
            "quiet_period_s": 0.5,
        },
    )
    try:
        config = str(tmp_path / "node" / "airouter.yaml")
        listing = _cli("models", "list", "--config", config, "--json")
        assert listing.returncode == 0, listing.stderr
        states = {m["name"]: m["state"] for m in json.loads(listing.stdout)}
        assert states["phantom-lung-segmentation"] == "READY"
        assert states["ct-lungs-unet"] == NOT_LOADED  # no rule runs it

        p = random_chest_phantom(
            np.random.default_rng(4242), slices=60, size=256, pixel_mm=1.5, slice_mm=5.0
        )
        study, files = write_ct_series(p.hu, p.affine, tmp_path / "ct")
        assert storescu(node.dimse_port, files).returncode == 0

        def done() -> dict[str, Any] | None:
            for job in _jobs(node):
                if job["study_uid"] == study and job["state"] in ("done", "failed"):
                    return job
            return None

        job = wait_for(done, 120, "the bundle's job")
        assert job["state"] == "done", job["error"]
        (seg_output,) = [o for o in job["outputs"] if o["kind"] == "SEG"]
        (path,) = list((node.data_dir / "archive").rglob(f"{seg_output['sop_instance_uid']}*"))
        seg = hd.seg.segread(path)
        assert seg.SegmentationType == "LABELMAP"  # as the rule asks
        segments = [x for x in seg.SegmentSequence if x.SegmentNumber > 0]  # 0: background
        (segment,) = segments
        assert segment.SegmentLabel == "Lung"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "phantom-lung-segmentation"
        assert algorithm.AlgorithmVersion.startswith("0.3.1 card:")
        masks = load_masks(node.data_dir / "jobs" / str(job["id"]) / "masks.npz")
        lungs = masks["phantom-lung-segmentation/Lung"]
        assert dice(lungs, p.right_lung | p.left_lung) > 0.9
        assert (node.data_dir / "jobs" / str(job["id"]) / "probabilities.npz").exists()
        (fractional_output,) = [o for o in job["outputs"] if o["kind"] == "PROBABILITY_MAP"]
        (fpath,) = list(
            (node.data_dir / "archive").rglob(f"{fractional_output['sop_instance_uid']}*")
        )
        fractional = hd.seg.segread(fpath)
        assert fractional.SegmentationType == "FRACTIONAL"
        assert fractional.SeriesNumber == 904
    finally:
        stop_process(node.process)


def test_bundle_without_codes_for_a_label_is_refused_with_the_reason(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    meta_path = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] = "mystery organ"
    meta_path.write_text(json.dumps(meta))
    result = _cli("models", "import", str(bundle), "--data-dir", str(tmp_path / "var"))
    assert result.returncode == 1
    assert "no coded concept for label(s) mystery organ" in result.stderr
    codes = tmp_path / "codes.yaml"
    codes.write_text(
        yaml.safe_dump(
            {
                "mystery organ": {
                    "category": {
                        "scheme": "SCT",
                        "value": "91723000",
                        "meaning": "Anatomical Structure",
                    },
                    "type": {"scheme": "SCT", "value": "39607008", "meaning": "Lung structure"},
                }
            }
        )
    )
    ok = _cli(
        "models", "import", str(bundle), "--data-dir", str(tmp_path / "var"), "--codes", str(codes)
    )
    assert ok.returncode == 0, ok.stderr


def test_export_repository_for_ngc_triton(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    result = _cli("models", "export-repository", str(out), "--backend", "libtorch")
    assert result.returncode == 0, result.stderr
    unet = (out / "ct-lungs-unet" / "config.pbtxt").read_text()
    assert 'platform: "pytorch_libtorch"' in unet and "INPUT__0" in unet
    assert (out / "ct-lungs-unet" / "1" / "model.pt").exists()
    assert not (out / "ct-lungs-unet" / "1" / "model.py").exists()
    assert 'backend: "python"' in (out / "ct-body" / "config.pbtxt").read_text()
    # the exported TorchScript is the shipped one, loadable by libtorch
    module = torch.jit.load(str(out / "ct-lungs-unet" / "1" / "model.pt"))
    assert module(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


class _Broken(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            raise RuntimeError("weights do not fit this input")
        return x


def test_a_failing_model_fails_its_job_with_the_servers_message_others_continue(
    tmp_path: Path,
) -> None:
    """Two rules match one study: the job of the broken model fails with what Triton said;
    the other job is unaffected."""
    from inference.serving.torchscript import MODEL_PY, config_pbtxt

    models = tmp_path / "node" / "var" / "models"
    entry = models / "repository" / "broken-net" / "1"
    entry.mkdir(parents=True)
    torch.jit.script(_Broken()).save(str(entry / "model.pt"))
    (entry / "model.py").write_text(MODEL_PY)
    (entry.parent / "config.pbtxt").write_text(config_pbtxt("broken-net", 1, 2, 3))
    card = yaml.safe_load((ROOT / "config/models/ct-lungs-unet.yaml").read_text())
    card.update(name="broken-net", triton_model="broken-net", training={})
    (models / "cards").mkdir()
    (models / "cards" / "broken-net.yaml").write_text(yaml.safe_dump(card))
    rules = tmp_path / "rules"
    rules.mkdir()
    for name, model in (("a-broken", "broken-net"), ("b-body", "ct-body")):
        (rules / f"{name}.yaml").write_text(
            yaml.safe_dump(
                {"rules": [{"name": name, "match": {"Modality": "CT"}, "models": [model]}]}
            )
        )
    node = start_node(
        tmp_path / "node", None, router={"rules_dir": str(rules), "quiet_period_s": 0.5}
    )
    try:
        study = _send_phantom(node, tmp_path / "s", 2)

        def finished() -> list[dict[str, Any]] | None:
            jobs = [j for j in _jobs(node) if j["study_uid"] == study]
            done = [j for j in jobs if j["state"] in ("done", "failed")]
            return done if len(done) == 2 else None

        jobs = {j["rule"]: j for j in wait_for(finished, 120, "both jobs")}
        assert jobs["a-broken"]["state"] == "failed"
        assert "model broken-net" in jobs["a-broken"]["error"]
        assert "weights do not fit this input" in jobs["a-broken"]["error"]
        assert jobs["b-body"]["state"] == "done" and not jobs["b-body"]["error"]
    finally:
        stop_process(node.process)
