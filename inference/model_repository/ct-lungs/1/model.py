"""Triton Python-backend entry point of ct-lungs."""

from inference.algorithms import segment_lungs
from inference.serving.python_model import python_model

TritonPythonModel = python_model(segment_lungs)
