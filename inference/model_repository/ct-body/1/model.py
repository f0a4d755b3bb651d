"""Triton Python-backend entry point of ct-body."""

from inference.algorithms import segment_body
from inference.serving.python_model import python_model

TritonPythonModel = python_model(segment_body)
