"""The ingest's rules for what is kept, on both databases: the first copy of an instance
stays, a spool file a crash left without its index row is indexed as it is, and a new
series is indexed from its whole header while later instances take the quick read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from sqlalchemy import delete, select

from airouter.core.db import Instance, Series, Store
from airouter.core.vocab import StoreStatus
from scp.header import index_header
from scp.ingest import Ingest, Outcome, Received
from tests.peers import head_ct_files


def _store(ingest: Ingest, source: Path, tmp: Path, name: str) -> Outcome:
    """``source`` received as a C-STORE would be: a temporary file, header read quickly
    where the series is known."""
    path = tmp / name
    shutil.copy(source, path)
    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    quick = index_header(path, ts)
    whole = pydicom.dcmread(path, stop_before_pixels=True)
    try:
        if quick is None:
            return ingest.store_instance(whole, Received(ts, path=path))
        return ingest.store_instance(quick, Received(ts, path=path), lambda: whole)
    finally:
        path.unlink(missing_ok=True)


def _ingest(tmp: Path, database_url: str) -> Ingest:
    return Ingest(Store(database_url), tmp / "spool", 0, 1 << 30, tmp / "incoming")


def test_the_first_copy_of_an_instance_stays(tmp_path: Path, database_url: str) -> None:
    ingest = _ingest(tmp_path, database_url)
    first = head_ct_files()[0]
    assert _store(ingest, first, tmp_path, "a.dcm").status == StoreStatus.SUCCESS
    other = pydicom.dcmread(first)
    other.ImageComments = "a different object under the same SOP Instance UID"
    other.save_as(tmp_path / "other.dcm")
    again = _store(ingest, tmp_path / "other.dcm", tmp_path, "b.dcm")
    assert (again.status, again.reason) == (StoreStatus.SUCCESS, "duplicate")
    [stored] = list((tmp_path / "spool").rglob("*.dcm"))
    assert stored.read_bytes() == first.read_bytes()
    with ingest.store.session() as s:
        assert len(s.scalars(select(Instance)).all()) == 1


def test_a_spool_file_without_its_row_is_indexed_as_it_is(
    tmp_path: Path, database_url: str
) -> None:
    ingest = _ingest(tmp_path, database_url)
    files = head_ct_files()[:2]
    for k, f in enumerate(files):
        assert _store(ingest, f, tmp_path, f"{k}.dcm").reason == ""
    with ingest.store.session() as s:
        orphan = s.scalars(select(Instance).where(Instance.instance_number.is_not(None))).first()
        assert orphan is not None
        uid, path = orphan.sop_instance_uid, Path(orphan.path)
        s.execute(delete(Instance).where(Instance.sop_instance_uid == uid))
    before = path.read_bytes()
    source = next(f for f in files if pydicom.dcmread(f).SOPInstanceUID == uid)
    outcome = _store(ingest, source, tmp_path, "again.dcm")
    assert (outcome.status, outcome.reason) == (StoreStatus.SUCCESS, "")
    assert path.read_bytes() == before
    with ingest.store.session() as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
        assert (Path(row.path), row.size) == (path, len(before))


def test_a_new_series_is_indexed_from_its_whole_header(tmp_path: Path, database_url: str) -> None:
    ingest = _ingest(tmp_path, database_url)
    files = head_ct_files()[:3]
    assert index_header(files[0], "1.2.840.10008.1.2.1") is not None  # the quick read applies
    for k, f in enumerate(files):
        assert _store(ingest, f, tmp_path, f"{k}.dcm").reason == ""
    with ingest.store.session() as s:
        series = s.scalars(select(Series)).one()
        numbers = sorted(n for n in s.scalars(select(Instance.instance_number)) if n is not None)
    whole = pydicom.dcmread(files[0], stop_before_pixels=True)
    # attributes only the whole header has: the quick read never names them
    assert series.tags.get("Manufacturer") == str(whole.Manufacturer)
    assert series.modality == "CT"
    assert numbers == sorted(int(pydicom.dcmread(f).InstanceNumber) for f in files)
