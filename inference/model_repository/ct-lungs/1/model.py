"""Triton Python-backend entry point of ct-lungs."""

from inference.algorithms import segment_lungs
from inference.serving.python_model import python_model

# BODY: ct-body's mask, when the job runs ct-body too (optional: computed here otherwise);
# BODY_BITS: the same as bits along each row (numpy packbits)
TritonPythonModel = python_model(segment_lungs, optional={"BODY": "body", "BODY_BITS": "body_bits"})
