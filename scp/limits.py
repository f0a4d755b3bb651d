"""Bounds on what a received instance may cost before it is parsed.

A Deflated Explicit VR Little Endian data set (PS3.5 A.5) is a raw deflate stream: 2 MB on the
wire can be 2 GB of zeros, and pydicom inflates the whole stream to read even the header. The
receivers measure the inflated size first, through a bounded stream (memory: one chunk), and
refuse what exceeds the configured limit.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import BinaryIO

from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

# Small steps keep the peak small: a deflated chunk of zeros expands a thousandfold, and each
# step copies the input left over (``unconsumed_tail``).
_READ = 16 << 10
_OUT = 256 << 10


class TooLarge(ValueError):
    """The instance would exceed a configured size limit; the message says which."""


def check_inflation(source: Path | bytes, limit_bytes: int) -> None:
    """Raise :class:`TooLarge` when ``source`` (a DICOM file with its meta information) is a
    deflated data set that inflates beyond ``limit_bytes``; other data sets pass untouched."""
    with open(source, "rb") if isinstance(source, Path) else io.BytesIO(source) as fp:
        read_preamble(fp, force=False)
        meta = _read_file_meta_info(fp)
        if str(meta.get("TransferSyntaxUID", "")) != DeflatedExplicitVRLittleEndian:
            return
        if _inflates_beyond(fp, limit_bytes):
            raise TooLarge(f"the deflated data set inflates beyond {limit_bytes >> 20} MB")


def _inflates_beyond(fp: BinaryIO, limit: int) -> bool:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while not inflater.eof:
        data = fp.read(_READ)
        if not data:
            break
        while data:
            total += len(inflater.decompress(data, _OUT))
            if total > limit:
                return True
            data = inflater.unconsumed_tail
            if inflater.eof:
                break
    return total > limit
