"""Triton Python-backend entry point: serves model.pt (see inference/triton_torch.py)."""

from inference.triton_torch import TorchScriptModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
