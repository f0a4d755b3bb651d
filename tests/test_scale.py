"""Scale: the state store on PostgreSQL as on SQLite, migrations, several writers at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
from sqlalchemy import func, inspect, select

from airouter.core.db import Base, Instance, Series, Store, Study
from airouter.core.vocab import StoreStatus
from scp.ingest import Ingest, Received
from tests.peers import fresh_copy, head_ct_files


def test_the_migrated_schema_is_the_models(database_url: str) -> None:
    """What the migrations build holds every column the models map, on either database, and
    a second start migrates nothing."""
    store = Store(database_url)
    inspector = inspect(store.engine)
    for table in Base.metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        assert {c.name for c in table.columns} <= present, table.name
    with store.engine.connect() as conn:
        (version,) = conn.exec_driver_sql("SELECT version_num FROM alembic_version").one()
    Store(database_url)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").one()[0] == version


def test_two_writers_storing_one_new_study_at_once_lose_nothing(
    database_url: str, tmp_path: Path
) -> None:
    """Two receivers with stores of their own (two nodes, or two worker processes), storing
    the instances of one new study in the same moments: both create the study and series,
    one of them wins, the other's instance is indexed on a second try; every instance is
    acknowledged and indexed once, and one that both receive is stored once."""
    files = fresh_copy(head_ct_files()[:12], tmp_path / "study")
    spool = tmp_path / "spool"
    writers = [Ingest(Store(database_url), spool) for _ in range(2)]
    answers: list[StoreStatus] = []
    start = threading.Barrier(2)

    def send(ingest: Ingest, paths: list[Path]) -> None:
        start.wait()
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            received = Received(transfer_syntax=str(ds.file_meta.TransferSyntaxUID))
            received = Received(
                transfer_syntax=received.transfer_syntax, data=path.read_bytes(), calling_ae="CT"
            )
            answers.append(ingest.store_instance(ds, received).status)

    # each writer sends half, and both send the first instance
    halves = [[files[0], *files[1::2]], [files[0], *files[2::2]]]
    threads = [
        threading.Thread(target=send, args=(w, h)) for w, h in zip(writers, halves, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == [StoreStatus.SUCCESS] * 13
    with writers[0].store.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 12
        assert s.scalar(select(func.count()).select_from(Series)) == 1
        assert s.scalar(select(func.count()).select_from(Study)) == 1
    assert len(list(spool.rglob("*.dcm"))) == 12
