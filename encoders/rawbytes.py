"""Explicit VR Little Endian bytes for the large, regular parts of the objects we write.

A SEG of a 500-slice CT with 20 organs has thousands of per-frame functional group items, an
RTSTRUCT hundreds of thousands of contour coordinates. As pydicom datasets each element is a
Python object, built, checked and written one by one: seconds per object. These parts are
instead encoded here, once, as the bytes of the standard encoding (PS3.5 7.1.2: explicit VR,
little endian; items of defined length), and placed in the dataset as pydicom raw data
elements, the form pydicom itself gives to elements read from a file. With the dataset's
original encoding set to explicit VR little endian they are written as they are; anything that
reads them (or writes them in another transfer syntax) gets them parsed by pydicom as usual.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

# VRs whose explicit-VR header has 2 reserved bytes and a 32-bit length (PS3.5 Table 7.1-1)
_LONG = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_ITEM = struct.Struct("<HHI")


def element(tag: int, vr: str, value: bytes) -> bytes:
    """One data element: tag, VR, length and the value padded to even length (UI with a NUL,
    OB with a zero byte, text with a space)."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "UN") else b" "
    group, number = tag >> 16, tag & 0xFFFF
    if vr in _LONG:
        return struct.pack("<HH2sHI", group, number, vr.encode(), 0, len(value)) + value
    if len(value) > 0xFFFF:
        # a value too long for a 16-bit length goes as UN, as pydicom's own writer does
        # (PS3.5 6.2.2); a receiver that knows the tag reads it with its real VR
        return struct.pack("<HH2sHI", group, number, b"UN", 0, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr.encode(), len(value)) + value


def text(tag: int, vr: str, value: str) -> bytes:
    """A string element (UI, CS, SH, LO, DS, IS ...); ASCII only, which is all we write here."""
    return element(tag, vr, value.encode("ascii"))


def item(content: bytes) -> bytes:
    """A sequence item of defined length."""
    return _ITEM.pack(0xFFFE, 0xE000, len(content)) + content


def sequence(tag: int, items: Iterable[bytes]) -> bytes:
    """A sequence element of defined length holding ``items`` (each already an item's bytes)."""
    return element(tag, "SQ", b"".join(items))


def code(value: str, scheme: str, meaning: str) -> bytes:
    """The content of a code sequence item (Code Value, Coding Scheme Designator, Meaning)."""
    return (
        text(0x00080100, "SH", value)
        + text(0x00080102, "SH", scheme)
        + text(0x00080104, "LO", meaning)
    )


def sop_reference(image: Dataset) -> bytes:
    """Referenced SOP Class and Instance UID of ``image`` (the content of a reference item)."""
    return text(0x00081150, "UI", str(image.SOPClassUID)) + text(
        0x00081155, "UI", str(image.SOPInstanceUID)
    )


def put(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Place an already encoded value (the bytes after the length field) in ``ds``."""
    ds[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def put_sequence(ds: Dataset, tag: int, items: Sequence[bytes]) -> None:
    """Place a sequence of already encoded items in ``ds``."""
    put(ds, tag, "SQ", b"".join(items))


def written_as_is(ds: Dataset) -> None:
    """Mark ``ds`` (a whole object or an item) as explicit VR little endian in the character
    set it is written in, so that pydicom
    writes its raw elements without parsing them (pydicom's optimised path for datasets with
    raw data elements). Writing it in any other transfer syntax still parses and converts
    them."""
    ds.set_original_encoding(False, True, ds._character_set)
