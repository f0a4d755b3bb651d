"""Triton Python-backend entry point of ct-body."""

from inference.algorithms import segment_body
from inference.serving.python_model import python_model

# its answer's buffer is kept between requests (first-touched memory is slow)
TritonPythonModel = python_model(segment_body, reuse_output=True)
