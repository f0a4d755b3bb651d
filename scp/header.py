"""The few top-level attributes the index needs, read from the start of a data set without
pydicom's element-by-element parse (PS3.5 7.1, 7.5).

pydicom reads every element of the header (about 130 in a CT slice: 1.5 ms) to give the
index five UIDs and a number. Once an instance's series is indexed, nothing else of its
header is needed, so :func:`scan` walks the elements of the data set's little endian
encoding (explicit or implicit VR), skipping values and sequences by their lengths, up to the
last attribute wanted, and hands those raw elements to a pydicom :class:`Dataset` (pydicom
still decodes their values, character set included). Anything it does not expect (big
endian, a length that runs past the end, a value it cannot skip) returns None, and the
caller reads the header with pydicom as before.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 Table 7.1-1)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}  # fmt: skip
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 16


# What the index needs of an instance whose series it has (and the PHI registry remembers)
INDEX_TAGS = (
    0x00080005,  # SpecificCharacterSet
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00100010,  # PatientName
    0x00100020,  # PatientID
    0x00100030,  # PatientBirthDate
    0x00101000,  # OtherPatientIDs
    0x0020000D,  # StudyInstanceUID
    0x0020000E,  # SeriesInstanceUID
    0x00200013,  # InstanceNumber
)
_EXPLICIT_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT = "1.2.840.10008.1.2"


class _Unexpected(Exception):
    """An encoding the scanner does not follow: pydicom reads this header."""


def scan(
    data: bytes | memoryview, offset: int, implicit: bool, wanted: Iterable[int]
) -> Dataset | None:
    """The elements of ``wanted`` (tags as ints) at the top level of the little endian data
    set that starts at ``offset`` of ``data``, as a pydicom Dataset of raw elements (absent
    ones are absent). The whole header is walked, up to the pixel data or the end, sequences
    and their items included: a structure pydicom could not read (a length beyond the end, an
    item that is not one) returns None, as does an encoding this scanner does not follow."""
    tags = set(wanted)
    view = data if isinstance(data, memoryview) else memoryview(data)
    found = Dataset()
    try:
        pos = offset
        while pos < len(view):
            tag, vr, length, header = _element_header(view, pos, implicit)
            if tag >= _PIXEL_DATA:
                break
            value_at = pos + header
            if length == _UNDEFINED:
                if tag in tags:
                    return None  # a wanted attribute is never a sequence
                pos = _skip_undefined(view, value_at, implicit or vr == b"UN", 0)
                continue
            end = value_at + length
            if end > len(view):
                return None
            if vr == b"SQ":
                _walk_items(view, value_at, end, implicit, 0)
            if tag in tags:
                found[tag] = RawDataElement(
                    Tag(tag),
                    None if implicit else vr.decode("ascii"),
                    length,
                    bytes(view[value_at:end]),
                    value_at,
                    implicit,
                    True,
                )
            pos = end
    except (_Unexpected, struct.error, UnicodeDecodeError):
        return None
    return found


def index_header(path: Path, transfer_syntax: str) -> Dataset | None:
    """:data:`INDEX_TAGS` of the DICOM file ``path`` (preamble, file meta, then the data set
    in ``transfer_syntax``); None where pydicom must read it."""
    if transfer_syntax in (_EXPLICIT_BIG_ENDIAN, _DEFLATED):
        return None
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        if size < 144:
            return None
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as data:
            # preamble, "DICM", then (0002,0000) UL 4: the length of the rest of the meta
            if data[128:140] != b"DICM\x02\x00\x00\x00UL\x04\x00":
                return None
            (meta_length,) = struct.unpack_from("<I", data, 140)
            view = memoryview(data)
            try:
                return scan(view, 144 + meta_length, transfer_syntax == _IMPLICIT, INDEX_TAGS)
            finally:
                view.release()


def _element_header(view: memoryview, pos: int, implicit: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR, value length, header size) of the element at ``pos``."""
    group, element = struct.unpack_from("<HH", view, pos)
    tag = (group << 16) | element
    if implicit or group == 0xFFFE:  # items and delimiters carry no VR
        (length,) = struct.unpack_from("<I", view, pos + 4)
        return tag, b"", length, 8
    vr = bytes(view[pos + 4 : pos + 6])
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise _Unexpected("not a VR")
    if vr in _LONG_VRS:
        if pos + 12 > len(view):
            raise _Unexpected("cut short")
        (length,) = struct.unpack_from("<I", view, pos + 8)
        return tag, vr, length, 12
    (length,) = struct.unpack_from("<H", view, pos + 6)
    return tag, vr, length, 8


def _skip_undefined(view: memoryview, pos: int, implicit: bool, depth: int) -> int:
    """The position after a value of undefined length (a sequence of items, ended by its
    delimiter) that starts at ``pos``."""
    if depth > _MAX_DEPTH:
        raise _Unexpected("nested too deep")
    while True:
        if pos + 8 > len(view):
            raise _Unexpected("cut short")
        tag, length = (
            struct.unpack_from("<I", view, pos)[0],
            struct.unpack_from("<I", view, pos + 4)[0],
        )
        tag = ((tag & 0xFFFF) << 16) | (tag >> 16)  # (group, element) as read little endian
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unexpected("not an item")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _skip_item(view, pos, implicit, depth + 1)


def _walk_items(view: memoryview, pos: int, end: int, implicit: bool, depth: int) -> None:
    """The items of a sequence of defined length, from ``pos`` to ``end``, each walked."""
    if depth > _MAX_DEPTH:
        raise _Unexpected("nested too deep")
    while pos < end:
        if pos + 8 > end:
            raise _Unexpected("cut short")
        group, element, length = struct.unpack_from("<HHI", view, pos)
        if (group << 16) | element != _ITEM:
            raise _Unexpected("not an item")
        pos += 8
        if length == _UNDEFINED:
            pos = _skip_item(view, pos, implicit, depth + 1)
            continue
        item_end = pos + length
        if item_end > end:
            raise _Unexpected("an item beyond its sequence")
        while pos < item_end:  # the item's elements
            _, vr, value_length, header = _element_header(view, pos, implicit)
            pos += header
            if value_length == _UNDEFINED:
                pos = _skip_undefined(view, pos, implicit or vr == b"UN", depth + 1)
                continue
            if pos + value_length > item_end:
                raise _Unexpected("an element beyond its item")
            if vr == b"SQ":
                _walk_items(view, pos, pos + value_length, implicit, depth + 1)
            pos += value_length
    if pos != end:
        raise _Unexpected("a sequence's items do not fill it")


def _skip_item(view: memoryview, pos: int, implicit: bool, depth: int) -> int:
    """The position after the elements of an item of undefined length and its delimiter."""
    while True:
        if pos + 8 > len(view):
            raise _Unexpected("cut short")
        tag, vr, length, header = _element_header(view, pos, implicit)
        if tag == _ITEM_END:
            return pos + 8
        pos += header
        if length == _UNDEFINED:
            pos = _skip_undefined(view, pos, implicit or vr == b"UN", depth)
            continue
        if pos + length > len(view):
            raise _Unexpected("cut short")
        if vr == b"SQ":
            _walk_items(view, pos, pos + length, implicit, depth + 1)
        pos += length
