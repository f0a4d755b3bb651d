"""Triton Python-backend entry point: model.pt (inference.serving.torchscript)."""

from inference.serving.torchscript import TorchScriptModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
