"""Adapter from a ``(hu, affine) -> labels`` function to a Triton Python-backend model.

Imported only inside tritonserver's Python backend stub, where ``triton_python_backend_utils``
exists (``map_region`` and ``read_refs`` are plain Python, tested without it).

A request gives its tensors as tensors, or, when the node runs on this host, by reference:
the ``REFS`` input (one JSON string) names the node's POSIX shared-memory regions that hold
inputs (the CT, another model's mask) and that the answer is written into. The stub maps them
and reads and writes them in place: no copy of the CT into the backend's own shared memory
and none of the labels back out of it (on a 1,000-slice CT, 500 MB in and 262 MB out per
model, each a first touch of memory on a new pool).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

Segmenter = Callable[..., np.ndarray]

SHM_DIR = "/dev/shm"
# the names the node's inference client gives its regions (inference.triton._RegionPool)
REGION_NAME = re.compile(r"airouter_[0-9A-Za-z_]{1,100}")
_DTYPES = {np.dtype(t).str: np.dtype(t) for t in (np.int16, np.uint8, np.float32)}


class RefError(ValueError):
    """A reference the stub refuses: a name, shape, type or size that does not fit."""


@dataclass(frozen=True)
class Ref:
    """One tensor by reference: the region's name, the array's shape and numpy type."""

    region: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the array, from the region's start."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def as_json(self) -> dict[str, object]:
        """The reference as the ``REFS`` JSON gives it."""
        return {"region": self.region, "shape": list(self.shape), "dtype": self.dtype.str}


def _ref(name: str, raw: object) -> Ref:
    if not isinstance(raw, dict):
        raise RefError(f"{name}: a reference is an object, not {type(raw).__name__}")
    region, shape, dtype = raw.get("region"), raw.get("shape"), raw.get("dtype")
    if not isinstance(region, str) or not REGION_NAME.fullmatch(region):
        raise RefError(f"{name}: region {region!r} is not one of the node's")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 5
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise RefError(f"{name}: shape {shape!r} is not 1 to 5 sizes")
    if dtype not in _DTYPES:
        raise RefError(f"{name}: type {dtype!r} is not one of {sorted(_DTYPES)}")
    return Ref(region, tuple(shape), _DTYPES[dtype])


def read_refs(text: bytes | str) -> tuple[dict[str, Ref], dict[str, Ref]]:
    """The inputs' and the outputs' references of a ``REFS`` JSON string
    (``{"inputs": {name: ref}, "outputs": {name: ref}}``, a ref being ``{"region", "shape",
    "dtype"}``); RefError if it is not that."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise RefError(f"REFS is not JSON: {exc}") from exc
    if not isinstance(raw, dict) or set(raw) - {"inputs", "outputs"}:
        raise RefError("REFS holds 'inputs' and 'outputs' only")
    out: list[dict[str, Ref]] = []
    for part in ("inputs", "outputs"):
        given = raw.get(part, {})
        if not isinstance(given, dict):
            raise RefError(f"REFS {part} is an object of references")
        out.append({name: _ref(name, r) for name, r in given.items()})
    return out[0], out[1]


@contextlib.contextmanager
def map_region(ref: Ref, writable: bool) -> Iterator[np.ndarray]:
    """The array ``ref`` names, mapped from its region in /dev/shm (read-only unless
    ``writable``), valid inside the ``with``; RefError if the region is missing or smaller."""
    path = os.path.join(SHM_DIR, ref.region)
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW)
    except OSError as exc:
        raise RefError(f"region {ref.region}: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        if ref.nbytes > size:
            raise RefError(f"region {ref.region} has {size} bytes, not {ref.nbytes}")
        if ref.nbytes == 0:
            yield np.empty(ref.shape, ref.dtype)
            return
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # one fault pass, not 100k
        mapped = mmap.mmap(fd, ref.nbytes, flags=flags, prot=prot)
    finally:
        os.close(fd)  # the mapping stays valid without it
    array = np.frombuffer(mapped, dtype=ref.dtype, count=ref.nbytes // ref.dtype.itemsize)
    try:
        yield array.reshape(ref.shape)
    finally:
        del array
        with contextlib.suppress(BufferError):  # a view still alive: unmapped when it dies
            mapped.close()


def python_model(
    segment: Segmenter, optional: dict[str, str] | None = None, reuse_output: bool = False
) -> type:
    """A ``TritonPythonModel`` class that runs ``segment(hu, affine)`` on each request;
    ``optional`` maps optional input tensors to the keyword ``segment`` takes them as (given
    only when the request has them). ``segment`` takes ``out=``, a uint8 array of the
    volume's shape to write the labels into: the region a request names for ``LABELS``,
    or, with ``reuse_output``, a buffer the model keeps for the next request of that shape
    when the labels travel as a tensor (memory touched for the first time costs about 7 ms
    per MB on a VM: 2 s for the labels of a 1,000-slice CT). A request whose REFS name a
    ``LABEL_BITS`` output gets each label's mask as bits there instead (``segment`` takes
    ``out_bits=``: (labels, slices, rows, ceil(columns / 8)) uint8)."""
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        _kept: np.ndarray | None = None

        def _out(self, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
            if not reuse_output:
                return {}
            if self._kept is None or self._kept.shape != shape:
                self._kept = None  # the old one goes before the new one is made
                self._kept = np.empty(shape, dtype=np.uint8)
            return {"out": self._kept}

        def _answer(self, request: Any) -> Any:
            given = pb_utils.get_input_tensor_by_name(request, "REFS")
            ins, outs = read_refs(given.as_numpy().reshape(-1)[0]) if given else ({}, {})
            with contextlib.ExitStack() as stack:
                arrays = {n: stack.enter_context(map_region(r, False)) for n, r in ins.items()}
                for name in ("CT", "AFFINE", *(optional or {})):
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None and name not in arrays:
                        arrays[name] = tensor.as_numpy()
                if "CT" not in arrays or "AFFINE" not in arrays:
                    raise RefError("the request has no CT or no AFFINE")
                hu = arrays["CT"]
                extra = {kw: arrays[t] for t, kw in (optional or {}).items() if t in arrays}
                if "LABEL_BITS" in outs:  # each label's mask as bits (card: labels_as_bits)
                    ref = outs["LABEL_BITS"]
                    packed = (*hu.shape[:2], -(-hu.shape[2] // 8))
                    if ref.dtype != np.uint8 or len(ref.shape) != 4 or ref.shape[1:] != packed:
                        raise RefError(f"LABEL_BITS: {ref.shape} {ref.dtype} for a {hu.shape} CT")
                    target = stack.enter_context(map_region(ref, True))
                    bits = segment(hu, arrays["AFFINE"], out_bits=target, **extra)
                    if bits.__array_interface__["data"][0] != target.ctypes.data:
                        np.copyto(target, bits, casting="unsafe")
                    del bits, target
                    answer, written = [], ref.nbytes
                elif "LABELS" not in outs:
                    extra.update(self._out(tuple(hu.shape)))
                    labels = np.ascontiguousarray(
                        segment(hu, arrays["AFFINE"], **extra), dtype=np.uint8
                    )
                    answer = [pb_utils.Tensor("LABELS", labels)]
                    written = 0
                else:
                    ref = outs["LABELS"]
                    if ref.shape != hu.shape or ref.dtype != np.uint8:
                        raise RefError(f"LABELS: {ref.shape} {ref.dtype} for a {hu.shape} CT")
                    target = stack.enter_context(map_region(ref, True))
                    labels = segment(hu, arrays["AFFINE"], out=target, **extra)
                    if labels.__array_interface__["data"][0] != target.ctypes.data:
                        np.copyto(target, labels, casting="unsafe")
                    del labels, target
                    answer, written = [], ref.nbytes
                del hu, arrays, extra  # no view of a mapped region outlives its mapping
            if given:  # what the caller checks: the bytes written into its regions
                answer.append(pb_utils.Tensor("WRITTEN", np.array([written], dtype=np.int64)))
            return pb_utils.InferenceResponse(output_tensors=answer)

        def execute(self, requests: list[Any]) -> list[Any]:
            responses = []
            for request in requests:
                try:
                    responses.append(self._answer(request))
                except Exception as exc:
                    responses.append(
                        pb_utils.InferenceResponse(
                            error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                        )
                    )
            return responses

    return TritonPythonModel
