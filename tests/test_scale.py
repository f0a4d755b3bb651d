"""Scale: the state store on PostgreSQL as on SQLite, migrations, several writers at once."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, inspect, select

from airouter.core.db import Base, Instance, Series, Store, Study
from airouter.core.vocab import StoreStatus
from scp.ingest import Ingest, Received
from tests.peers import fresh_copy, head_ct_files
from tests.test_jobs import _job


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


@pytest.mark.parametrize("one_process", [False, True], ids=["two-stores", "one-ingest"])
def test_two_writers_storing_one_new_study_at_once_lose_nothing(
    database_url: str, tmp_path: Path, one_process: bool
) -> None:
    """Two receivers with stores of their own (two nodes, or two worker processes), or two
    associations of one process, storing the instances of one new study in the same moments:
    both create the study and series, one of them wins, the other's instance is indexed on a
    second try; every instance is acknowledged and indexed once, and one that both receive is
    stored once. (In one process the second instance in flight takes the other path of the
    ingest: file first, then the index.)"""
    files = fresh_copy(head_ct_files()[:12], tmp_path / "study")
    spool = tmp_path / "spool"
    if one_process:
        writers = [Ingest(Store(database_url), spool)] * 2
    else:
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


def test_a_dead_nodes_job_is_taken_over_once_its_lease_expires(database_url: str) -> None:
    """Node A claims a job and dies (stops renewing); node B leaves it alone while the lease
    runs, then queues it again and claims it; A, were it only slow, can write nothing more."""
    import pytest

    from airouter.core.db import Job
    from airouter.core.leases import Identity, heartbeat
    from airouter.core.vocab import JobState
    from airouter.jobs.lifecycle import recover_jobs
    from airouter.jobs.recorder import JobRecorder, JobTakenOver
    from router.queue import claim_next_job
    from tests.peers import wait_for

    store = Store(database_url)
    a, b = Identity("node-a", lease_s=1.0), Identity("node-b", lease_s=1.0)
    job_id = _job(store)
    assert claim_next_job(store, a.owner, a.until()) == job_id
    assert claim_next_job(store, b.owner, b.until()) is None  # claimed once
    assert recover_jobs(store, 3).requeued == []  # A's lease is live
    heartbeat(store, a)  # A renews it while it lives ...
    assert recover_jobs(store, 3).requeued == []
    # ... and then dies: once the lease has run out, any node's recovery pass takes it back
    wait_for(lambda: recover_jobs(store, 3).requeued == [job_id], 5, "the lease to expire")
    assert claim_next_job(store, b.owner, b.until()) == job_id
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.lease_owner, job.attempts) == (JobState.RUNNING, b.owner, 2)
    with pytest.raises(JobTakenOver, match="taken over by node-b/"):
        JobRecorder(store, job_id, a.owner).transition(JobState.DONE)
    JobRecorder(store, job_id, b.owner).transition(JobState.DONE)


def test_a_delivery_is_claimed_by_one_node_and_released_when_it_dies(database_url: str) -> None:
    from airouter.core.db import Delivery, Output
    from airouter.core.leases import Identity, release_deliveries
    from airouter.core.settings import DispatchSettings
    from airouter.core.vocab import DeliveryState, OutputKind
    from dispatch.outbox import Dispatcher
    from tests.peers import wait_for

    store = Store(database_url)
    job_id = _job(store)
    with store.session() as s:
        output = Output(
            job_id=job_id, kind=OutputKind.SEG, sop_instance_uid="1.9", series_uid="1.8", path="/x"
        )
        s.add(output)
        s.flush()
        s.add_all([Delivery(output_id=output.id, destination="pacs") for _ in range(3)])
    settings = DispatchSettings()
    a = Dispatcher(store, settings, Identity("node-a", lease_s=1.0))
    b = Dispatcher(store, settings, Identity("node-b", lease_s=1.0))
    assert [row.id for row in a._claim()] == [1, 2, 3]
    assert b._claim() == []  # each delivery is sent by one node
    assert release_deliveries(store) == []  # A's lease is live
    wait_for(lambda: release_deliveries(store) == [1, 2, 3], 5, "A's lease to expire")
    with store.session() as s:
        assert {d.state for d in s.scalars(select(Delivery))} == {DeliveryState.FAILED}
    assert [row.id for row in b._claim()] == [1, 2, 3]


def test_a_name_is_held_by_one_live_node_and_taken_back_after_a_crash(database_url: str) -> None:
    import socket
    import subprocess

    import pytest

    from airouter.core.db import Node, utcnow
    from airouter.core.leases import Identity, NodeNameInUse, register

    store = Store(database_url)
    first = Identity("ct-node", lease_s=30.0)
    assert register(store, first) == []
    alive = subprocess.Popen(["sleep", "30"])  # the first run, alive on this host ...
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        for host, pid in ((socket.gethostname(), alive.pid), ("other-host", dead.pid)):
            with store.session() as s:
                row = s.get(Node, "ct-node")
                assert row is not None
                row.host, row.pid, row.heartbeat_at = host, pid, utcnow()
            with pytest.raises(NodeNameInUse, match="a node named 'ct-node' is running"):
                register(store, Identity("ct-node", lease_s=30.0))  # ... or on another
    finally:
        alive.kill()
        alive.wait()
    # the first run's process died (kill -9): a new run takes its name and its work back
    with store.session() as s:
        row = s.get(Node, "ct-node")
        assert row is not None
        row.host, row.pid, row.heartbeat_at = socket.gethostname(), dead.pid, utcnow()
    assert register(store, Identity("ct-node", lease_s=30.0)) == [first.owner]


def test_a_node_starting_leaves_the_other_nodes_transfers_alone(tmp_path: Path) -> None:
    """Nodes sharing a data directory each receive into a folder of their own: a start
    clears its own leftovers (never acknowledged), not a live node's transfers in flight."""
    from airouter.core.settings import Settings
    from scp.server import configure_pynetdicom

    a = Settings(data_dir=tmp_path, node_name="node-a")
    b = Settings(data_dir=tmp_path, node_name="node-b")
    assert a.spool_dir == b.spool_dir and a.incoming_dir != b.incoming_dir
    for settings in (a, b):
        settings.incoming_dir.mkdir(parents=True)
        (settings.incoming_dir / "in-flight.dcm").write_bytes(b"half a data set")
    configure_pynetdicom(a.incoming_dir)  # node A (re)starts
    assert not (a.incoming_dir / "in-flight.dcm").exists()
    assert (b.incoming_dir / "in-flight.dcm").exists()


def test_receiver_processes_share_the_port_and_end_with_the_node(tmp_path: Path) -> None:
    """``scp.processes: 2``: a worker process accepts from the node's DIMSE socket; 16
    parallel associations are spread over both (whichever is free takes the next), every
    instance is stored and indexed once, and the worker ends with the node."""
    import os
    import subprocess

    from tests.peers import free_port, start_node, stop_process, tool, wait_for

    rules = tmp_path / "rules"
    rules.mkdir()
    node = start_node(
        tmp_path / "node",
        None,
        wait_triton=False,
        # 16 at once from one address: each process may take all of them (the kernel picks)
        scp={"processes": 2, "max_associations_per_source": 16},
        router={"rules_dir": str(rules)},
        inference={"triton_url": f"127.0.0.1:{free_port()}"},
        node_name="ingest",
    )
    store = Store(f"sqlite:///{node.data_dir / 'airouter.db'}")
    try:
        children = wait_for(lambda: _children(node.process.pid), 30, "the receiver process")
        # the worker answers HTTP once it serves DIMSE; both accept from the node's socket
        wait_for(lambda: _listeners(node.http_port) == 2, 60, "the worker on the HTTP port")
        assert _listeners(node.dimse_port) == 1
        files = fresh_copy(head_ct_files()[:48], tmp_path / "study")
        senders = [
            subprocess.Popen(
                [tool("storescu"), "-aec", "AIROUTER", "127.0.0.1", str(node.dimse_port)]
                + [str(f) for f in files[k::16]],
                env={**os.environ, "TCP_NODELAY": "1"},
                stderr=subprocess.PIPE,
            )
            for k in range(16)
        ]
        for sender in senders:
            assert sender.wait(timeout=120) == 0
        with store.session() as s:
            by = dict(
                s.execute(
                    select(Instance.received_by, func.count()).group_by(Instance.received_by)
                ).all()
            )
        assert sum(by.values()) == 48
        assert set(by) == {"ingest", "ingest-r1"}, by
    finally:
        stop_process(node.process)
    for pid in children:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 15, f"receiver {pid} gone")


def _listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (from the kernel's table)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue
        if fields.get("PPid", "").strip() == str(pid) and "python" in fields.get("Name", ""):
            found.append(int(status.parent.name))
    return found


def test_index_rows_a_power_cut_took_are_rebuilt_from_the_spool(
    database_url: str, tmp_path: Path
) -> None:
    """Index commits do not wait for an fsync of their own (the spool file had one): a power
    cut may take the commits after the last durability mark. Simulated here by deleting the
    rows committed after the mark (a power cut cannot be had in a test): the start-up pass
    indexes the spool files that lack rows, and only in series folders changed since the
    mark."""
    from datetime import timedelta

    from sqlalchemy import delete

    from airouter.core.db import Event, utcnow
    from airouter.core.vocab import Source, StudyState

    store = Store(database_url, sync_commits=False)
    spool = tmp_path / "spool"
    ingest = Ingest(store, spool)

    def store_all(paths: list[Path]) -> None:
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            received = Received(str(ds.file_meta.TransferSyntaxUID), data=path.read_bytes())
            assert ingest.store_instance(ds, received).status == StoreStatus.SUCCESS

    first = fresh_copy(head_ct_files()[:10], tmp_path / "first")
    second = fresh_copy(head_ct_files()[:3], tmp_path / "second")
    store_all(first[:6])
    store.mark_durable("spool")
    mark = store.durable_mark("spool")
    assert mark is not None and abs((utcnow() - mark).total_seconds()) < 5
    store_all(first[6:] + second)  # committed after the mark ...
    lost_study = pydicom.dcmread(second[0], stop_before_pixels=True).StudyInstanceUID
    with store.session() as s:  # ... and lost with the power
        newest = s.scalars(select(Instance.id).order_by(Instance.id.desc()).limit(7)).all()
        s.execute(delete(Instance).where(Instance.id.in_(newest)))
        s.execute(delete(Series).where(Series.study_uid == lost_study))
        s.execute(delete(Study).where(Study.study_uid == lost_study))
    assert ingest.reconcile(utcnow() + timedelta(hours=1)) == 0  # nothing changed since then
    assert ingest.reconcile(mark - timedelta(seconds=60)) == 7
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 13
        rebuilt = s.get(Study, lost_study)
        assert rebuilt is not None and rebuilt.state is StudyState.RECEIVING  # completes as usual
        sources = s.scalars(select(Instance.source).order_by(Instance.id)).all()
        assert sources[:6] == [Source.DIMSE] * 6 and set(sources[6:]) == {Source.SPOOL}
        assert s.scalars(select(Event.kind).where(Event.kind == "index_rebuilt")).all()
    assert ingest.reconcile(None) == 0  # idempotent, even over the whole spool
