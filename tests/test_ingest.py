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


def test_the_quick_sqlite_path_writes_the_rows_the_full_path_writes(tmp_path: Path) -> None:
    """On SQLite the common case (study receiving, series indexed) is written on the DBAPI
    connection; its rows must be what SQLAlchemy writes: every column, dates as the same text,
    enums by name, the study touched. The first instance takes the full path (new study and
    series), the others the quick one, alone in the process and with another in flight."""
    import sqlite3

    from airouter.core.db import Study
    from scp.ingest import _RAW

    database = tmp_path / "a.db"
    ingest = _ingest(tmp_path, f"sqlite:///{database}")
    files = head_ct_files()[:4]
    assert {c.name for c in Instance.__table__.columns} - {"id"} == set(_RAW.columns)
    assert _store(ingest, files[0], tmp_path, "0.dcm").status == StoreStatus.SUCCESS
    with ingest.store.session() as s:
        (study,) = s.scalars(select(Study)).all()
        opened = study.last_received_at
    assert _store(ingest, files[1], tmp_path, "1.dcm").status == StoreStatus.SUCCESS
    with ingest._counted():  # another instance in flight: the file first, then the rows
        assert _store(ingest, files[2], tmp_path, "2.dcm").status == StoreStatus.SUCCESS
    again = _store(ingest, files[2], tmp_path, "2b.dcm")
    assert (again.status, again.reason) == (StoreStatus.SUCCESS, "duplicate")
    assert _store(ingest, files[3], tmp_path, "3.dcm").status == StoreStatus.SUCCESS
    with sqlite3.connect(database) as raw:
        rows = raw.execute(
            "SELECT typeof(received_at), length(received_at), source, received_by IS NULL, "
            "calling_ae, transfer_syntax, typeof(size), typeof(instance_number) "
            "FROM instances ORDER BY id"
        ).fetchall()
    assert len(rows) == 4 and len(set(rows)) == 1, rows  # the full path's row, three times
    with ingest.store.session() as s:
        instances = s.scalars(select(Instance).order_by(Instance.id)).all()
        assert [i.sop_instance_uid for i in instances] == [
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
        ]
        assert all(i.size == f.stat().st_size for i, f in zip(instances, files, strict=True))
        assert [i.instance_number for i in instances] == [
            int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files
        ]
        (study,) = s.scalars(select(Study)).all()
        assert study.last_received_at > opened  # touched by the quick path
        assert instances[-1].received_at >= instances[0].received_at
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 4
