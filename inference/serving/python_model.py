"""Adapter from a ``(hu, affine) -> labels`` function to a Triton Python-backend model.

Imported only inside tritonserver's Python backend stub, where ``triton_python_backend_utils``
exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Segmenter = Callable[..., np.ndarray]


def python_model(segment: Segmenter, optional: dict[str, str] | None = None) -> type:
    """A ``TritonPythonModel`` class that runs ``segment(hu, affine)`` on each request;
    ``optional`` maps optional input tensors to the keyword ``segment`` takes them as (given
    only when the request has them)."""
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests: list[Any]) -> list[Any]:
            responses = []
            for request in requests:
                try:
                    hu = pb_utils.get_input_tensor_by_name(request, "CT").as_numpy()
                    affine = pb_utils.get_input_tensor_by_name(request, "AFFINE").as_numpy()
                    extra = {}
                    for tensor, keyword in (optional or {}).items():
                        given = pb_utils.get_input_tensor_by_name(request, tensor)
                        if given is not None:
                            extra[keyword] = given.as_numpy()
                    labels = np.ascontiguousarray(segment(hu, affine, **extra), dtype=np.uint8)
                    responses.append(
                        pb_utils.InferenceResponse(
                            output_tensors=[pb_utils.Tensor("LABELS", labels)]
                        )
                    )
                except Exception as exc:
                    responses.append(
                        pb_utils.InferenceResponse(
                            error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                        )
                    )
            return responses

    return TritonPythonModel
