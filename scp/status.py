"""DIMSE status codes the node returns (PS3.4 B.2.3, PS3.7 C), as one enum."""

from __future__ import annotations

import enum


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # refused: could not make the instance durable
    DATASET_MISMATCH = 0xA900  # error: data set does not match SOP class
    CANNOT_UNDERSTAND = 0xC210  # error: cannot understand (missing/invalid identifiers)
    PROCESSING_FAILURE = 0x0110
