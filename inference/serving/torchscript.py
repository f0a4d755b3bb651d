"""A Triton Python-backend model that serves a TorchScript file (``model.pt`` beside it).

The local tritonserver (from nvidia-pytriton) ships only the Python backend, so network models
run through this wrapper; ``airouter models export-repository --backend libtorch`` writes the
same model for the NGC container's ``pytorch_libtorch`` backend instead. Tensor names follow
the libtorch convention (``INPUT__0`` -> ``OUTPUT__0``) so both configurations serve the same
requests. Imported only inside tritonserver's Python backend stub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class TorchScriptModel:
    """A Triton Python-backend model that runs a TorchScript file on CPU or GPU."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load ``model.pt`` beside the entry point, on the instance's device."""
        import torch

        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        directory = Path(args["model_repository"]) / args["model_version"]
        use_gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(
            f"cuda:{args.get('model_instance_device_id', '0')}" if use_gpu else "cpu"
        )
        self.module = torch.jit.load(str(directory / "model.pt"), map_location=self.device)
        self.module.eval()

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request: the network's output for the input tensor, or the error."""
        import torch
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                batch = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
                with torch.no_grad():
                    x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                    y = self.module(x.to(self.device)).float().cpu().numpy()
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(self.output_name, np.ascontiguousarray(y))]
                    )
                )
            except Exception as exc:
                responses.append(
                    pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                    )
                )
        return responses


def config_pbtxt(
    name: str, in_channels: int, out_channels: int, spatial_dims: int, backend: str = "python"
) -> str:
    """config.pbtxt of a dense network: (B, C_in, *spatial) FP32 -> (B, C_out, *spatial) FP32."""
    dims = ", ".join(["-1"] * spatial_dims)
    lines = [
        f'name: "{name}"',
        f'backend: "{backend}"' if backend == "python" else 'platform: "pytorch_libtorch"',
        "max_batch_size: 0",
        "input [",
        f'  {{ name: "INPUT__0" data_type: TYPE_FP32 dims: [ -1, {in_channels}, {dims} ] }}',
        "]",
        "output [",
        f'  {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ -1, {out_channels}, {dims} ] }}',
        "]",
        "instance_group [ { kind: KIND_CPU count: 1 } ]",
    ]
    return "\n".join(lines) + "\n"


MODEL_PY = '''"""Triton Python-backend entry point: model.pt (inference.serving.torchscript)."""

from inference.serving.torchscript import TorchScriptModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
'''
