"""The quick header read (scp/header.py) against pydicom's: the same values of every
attribute the index takes from it, on every real file in the shared data and on encodings
made to exercise it; None (pydicom reads it) wherever the structure is broken."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from airouter.core.tags import read_or_none
from scp.header import INDEX_TAGS, index_header
from tests.peers import SHARED_DICOM

KEYWORDS = [pydicom.datadict.keyword_for_tag(t) for t in INDEX_TAGS]


def _shared_files() -> list[Path]:
    found = []
    for path in sorted(SHARED_DICOM.rglob("*")):
        if not path.is_file():
            continue
        with path.open("rb") as fp:
            head = fp.read(132)
        if head[128:132] == b"DICM":
            found.append(path)
    return found


def _values(ds: Dataset) -> dict[str, object]:
    return {k: str(read_or_none(ds, k)) for k in KEYWORDS}


def test_every_shared_file_reads_as_pydicom_reads_it() -> None:
    files = _shared_files()
    assert len(files) > 100
    quick = 0
    for path in files:
        full = pydicom.dcmread(path, stop_before_pixels=True)
        ts = str(full.file_meta.get("TransferSyntaxUID", ""))
        if not ts:
            continue  # not a receivable file: the C-STORE context names the syntax
        ds = index_header(path, ts)
        if ds is None:
            continue  # pydicom reads it: nothing to compare
        quick += 1
        assert _values(ds) == _values(full), path
    assert quick > 0.9 * len(files)  # the quick read is the rule, not the exception


def _file(tmp: Path, ds: Dataset, transfer_syntax: str) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    path = tmp / f"{transfer_syntax}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _nested() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "P-17"
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D0050", "SRT", "Tissue"
    deeper = Dataset()
    deeper.ReferencedSOPInstanceUID = generate_uid()
    inner.ReferencedSOPSequence = Sequence([deeper])
    ds.AnatomicRegionSequence = Sequence([inner, Dataset()])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.InstanceNumber = 12
    ds.add_new(0x00291010, "OB", b"\x01\x02")  # private, after the wanted ones but before 7FE0
    return ds


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined_lengths", [False, True])
def test_sequences_character_sets_and_both_vr_encodings(
    tmp_path: Path, transfer_syntax: str, undefined_lengths: bool
) -> None:
    ds = _nested()
    if undefined_lengths:
        ds.AnatomicRegionSequence.is_undefined_length = True
        for item in ds.AnatomicRegionSequence:
            item.is_undefined_length_sequence_item = True
    path = _file(tmp_path, ds, transfer_syntax)
    quick = index_header(path, transfer_syntax)
    assert quick is not None
    assert _values(quick) == _values(pydicom.dcmread(path, stop_before_pixels=True))
    assert str(quick.PatientName) == "Müller^Jürgen"
    assert quick.InstanceNumber == 12


@pytest.mark.parametrize("cut", ["inside an element", "inside a sequence", "a length beyond"])
def test_a_broken_structure_is_left_to_pydicom(tmp_path: Path, cut: str) -> None:
    path = _file(tmp_path, _nested(), ExplicitVRLittleEndian)
    data = bytearray(path.read_bytes())
    at = data.find(b"\x08\x00\x18\x22SQ")  # AnatomicRegionSequence (0008,2218)
    assert at > 0
    if cut == "inside an element":
        data = data[: len(data) - 3]
    elif cut == "inside a sequence":
        data[at + 12 : at + 16] = b"\x00\x00\x00\x00"  # the first item's tag is not an item
    else:
        data[at + 8 : at + 12] = (10**6).to_bytes(4, "little")  # the sequence runs past the end
    path.write_bytes(bytes(data))
    assert index_header(path, ExplicitVRLittleEndian) is None


def test_big_endian_and_deflated_are_left_to_pydicom(tmp_path: Path) -> None:
    path = _file(tmp_path, _nested(), ExplicitVRLittleEndian)
    assert index_header(path, "1.2.840.10008.1.2.2") is None
    assert index_header(path, "1.2.840.10008.1.2.1.99") is None
