"""The SCP on a real association: DCMTK echoscu/storescu and pynetdicom as the peers."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context
from sqlalchemy import func, select

from airouter.core.db import Instance, Store, Study
from airouter.core.settings import ScpSettings, Settings
from airouter.core.tracker import AssociationTracker
from airouter.core.vocab import StoreStatus
from router.completion import CompletionMonitor, CompletionPolicy
from scp.ingest import Ingest
from scp.server import ExtraService, open_associations, start_dimse
from tests.peers import free_port, fresh_copy, head_ct_files, storescu, tool, wait_for


class Node:
    def __init__(
        self,
        tmp: Path,
        spool: Path | None = None,
        reserve_bytes: int = 0,
        database_url: str | None = None,
        extra: Sequence[ExtraService] = (),
        **settings: Any,
    ) -> None:
        scp = ScpSettings(dimse_host="127.0.0.1", dimse_port=free_port(), **settings)
        self.settings = Settings(data_dir=tmp, scp=scp, database_url=database_url)
        self.store = Store(self.settings.db_url)
        self.tracker = AssociationTracker()
        self.ingest = Ingest(self.store, spool or self.settings.spool_dir, reserve_bytes)
        self.server = start_dimse(scp, self.ingest, self.tracker, self.settings.incoming_dir, extra)
        self.port = scp.dimse_port

    def count(self) -> int:
        with self.store.session() as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


@pytest.fixture
def node(tmp_path: Path, database_url: str) -> Iterator[Node]:
    """The DIMSE receiver on the state store on SQLite and on PostgreSQL."""
    n = Node(tmp_path, database_url=database_url)
    yield n
    n.server.shutdown()


def test_echoscu_gets_success(node: Node) -> None:
    result = subprocess.run(
        [tool("echoscu"), "-aec", "AIROUTER", "127.0.0.1", str(node.port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0


def test_stored_instances_are_on_disk_and_indexed_once(node: Node) -> None:
    files = head_ct_files()[:5]
    assert storescu(node.port, files).returncode == 0
    assert storescu(node.port, files).returncode == 0  # the same instances again
    assert node.count() == 5
    with node.store.session() as s:
        for inst in s.scalars(select(Instance)).all():
            stored = pydicom.dcmread(inst.path)
            assert stored.SOPInstanceUID == inst.sop_instance_uid
            assert Path(inst.path).relative_to(node.settings.spool_dir).parts[:2] == (
                inst.study_uid,
                inst.series_uid,
            )
    original = pydicom.dcmread(files[0])
    with node.store.session() as s:
        path = s.scalar(
            select(Instance.path).where(Instance.sop_instance_uid == original.SOPInstanceUID)
        )
    assert pydicom.dcmread(path).PixelData == original.PixelData  # stored as received


def _send(port: int, path: Path) -> pydicom.Dataset:
    """Send one file as stored, identified by its file meta (pynetdicom, chunked)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="TESTSCU")
    ae.requested_contexts = [build_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])]
    assoc = ae.associate("127.0.0.1", port, ae_title="AIROUTER")
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()


def test_empty_sop_instance_uid_falls_back_to_the_request(node: Node, tmp_path: Path) -> None:
    ds = pydicom.dcmread(head_ct_files()[0])
    sop = ds.SOPInstanceUID
    ds.SOPInstanceUID = ""
    ds.save_as(tmp_path / "blank.dcm")  # file meta keeps the UID: the request carries it
    status = _send(node.port, tmp_path / "blank.dcm")
    assert status.Status == StoreStatus.SUCCESS
    with node.store.session() as s:
        assert s.scalar(select(Instance.sop_instance_uid)) == sop


def test_a_data_set_without_its_sop_class_is_stored_said_and_sent_whole(
    node: Node, tmp_path: Path
) -> None:
    """The request carries the SOP Class UID the data set lacks: the node stores the instance,
    records that it relied on the request, and what it forwards carries the UID again (every
    forward of such an instance used to fail)."""
    from airouter.core.db import Event
    from airouter.core.settings import DicomNode, DispatchSettings
    from dispatch.senders import send_dicom

    ds = pydicom.dcmread(head_ct_files()[0])
    sop_class = ds.SOPClassUID
    del ds.SOPClassUID
    ds.save_as(tmp_path / "noclass.dcm")  # file meta keeps it: the request carries it
    assert _send(node.port, tmp_path / "noclass.dcm").Status == StoreStatus.SUCCESS
    with node.store.session() as s:
        inst = s.scalars(select(Instance)).one()
        detail = s.scalar(select(Event.detail).where(Event.kind == "identifiers_from_command"))
    assert inst.sop_class_uid == sop_class
    assert detail is not None and "SOPClassUID" in detail and inst.sop_instance_uid in detail
    (tmp_path / "pacs").mkdir()
    pacs = Node(tmp_path / "pacs")
    try:
        destination = DicomNode(ae_title="AIROUTER", host="127.0.0.1", port=pacs.port)
        ((_, ok, answer),) = send_dicom(destination, [(1, inst.path)], DispatchSettings())
        assert ok, answer
        with pacs.store.session() as s:
            received = s.scalars(select(Instance)).one()
        assert received.sop_class_uid == sop_class
        assert pydicom.dcmread(received.path).SOPClassUID == sop_class  # in the data set
    finally:
        pacs.server.shutdown()


def test_missing_study_uid_is_refused_with_a_reason(node: Node, tmp_path: Path) -> None:
    ds = pydicom.dcmread(head_ct_files()[0])
    ds.StudyInstanceUID = ""
    ds.save_as(tmp_path / "nostudy.dcm")
    status = _send(node.port, tmp_path / "nostudy.dcm")
    assert status.Status == StoreStatus.CANNOT_UNDERSTAND
    assert status.ErrorComment == "StudyInstanceUID is missing or empty"
    assert node.count() == 0


def test_uid_with_path_characters_is_refused(node: Node, tmp_path: Path) -> None:
    ds = pydicom.dcmread(head_ct_files()[0])
    ds.SeriesInstanceUID = "../../../../tmp/x"
    ds.save_as(tmp_path / "evil.dcm")
    status = _send(node.port, tmp_path / "evil.dcm")
    assert status.Status == StoreStatus.CANNOT_UNDERSTAND
    assert not list(tmp_path.parent.glob("tmp/x*"))


def test_failure_to_persist_is_out_of_resources_and_nothing_is_indexed(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    n = Node(tmp_path, spool=blocker)
    try:
        status = _send(n.port, head_ct_files()[0])
        assert status.Status == StoreStatus.OUT_OF_RESOURCES
        assert n.count() == 0
    finally:
        n.server.shutdown()


def test_study_completes_only_after_release_and_quiet_period(node: Node) -> None:
    routed: list[str] = []
    policy = CompletionPolicy(quiet_period_s=0.0)
    monitor = CompletionMonitor(node.store, node.tracker, policy, lambda s, uid: routed.append(uid))
    files = head_ct_files()[:3]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.dcmread(files[0]).SOPClassUID, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AIROUTER")
    for f in files:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0
    assert monitor.check() == []  # association still open
    assoc.release()
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    done = monitor.check()
    assert done == [study] and routed == [study]
    assert monitor.check() == []  # once
    slow = CompletionMonitor(
        node.store, node.tracker, CompletionPolicy(quiet_period_s=3600.0), lambda s, uid: None
    )
    with node.store.session() as s:
        s.get(Study, study).state = "receiving"  # type: ignore[union-attr]
    assert slow.check() == []  # quiet period not over


def _associate(port: int, sop_class: str, syntaxes: list[str]) -> object:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="AIROUTER")
    assert assoc.is_established
    return assoc


def test_private_sop_class_is_accepted_and_stored(node: Node) -> None:
    ds = pydicom.dcmread(head_ct_files()[0])
    private_class = "1.3.46.670589.99.1.2"  # a vendor's private storage class
    ds.SOPClassUID = private_class
    ds.file_meta.MediaStorageSOPClassUID = private_class
    assoc = _associate(node.port, private_class, ["1.2.840.10008.1.2.1"])
    try:
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    with node.store.session() as s:
        assert s.scalar(select(Instance.sop_class_uid)) == private_class


def test_compressed_instance_is_stored_as_received(node: Node) -> None:
    """Offered [JPEG 2000, explicit LE], the node takes the sender's first choice and stores
    the encoded data set byte for byte: no transcoding anywhere."""
    from tests.peers import BODY_J2K

    source = sorted(BODY_J2K.iterdir())[0]
    original = pydicom.dcmread(source)
    original.StudyInstanceUID, original.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.5"
    original.SOPInstanceUID = original.file_meta.MediaStorageSOPInstanceUID
    original.SOPClassUID = original.file_meta.MediaStorageSOPClassUID
    j2k = str(original.file_meta.TransferSyntaxUID)
    assoc = _associate(node.port, original.SOPClassUID, [j2k, "1.2.840.10008.1.2.1"])
    try:
        assert assoc.send_c_store(original).Status == StoreStatus.SUCCESS  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    with node.store.session() as s:
        inst = s.scalars(select(Instance)).one()
    assert inst.transfer_syntax == j2k
    stored = pydicom.dcmread(inst.path)
    assert stored.file_meta.TransferSyntaxUID == j2k
    assert stored.PixelData == original.PixelData


def _send_open(port: int, files: list[Path]) -> object:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.dcmread(files[0]).SOPClassUID, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="AIROUTER")
    for f in files:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0  # type: ignore[attr-defined]
    return assoc


def test_announced_counts_complete_a_study_at_release(node: Node) -> None:
    """The GE fMRI series announces 15 images x 10 temporal positions: complete at release,
    with no quiet period to wait for; one image short, it waits."""
    from tests.peers import MR_EPI

    files = sorted(MR_EPI.glob("*.dcm"))
    assert len(files) == 150
    routed: list[str] = []
    monitor = CompletionMonitor(
        node.store,
        node.tracker,
        CompletionPolicy(quiet_period_s=3600.0),
        lambda s, uid: routed.append(uid),
    )
    assoc = _send_open(node.port, files[:-1])
    assoc.release()  # type: ignore[attr-defined]
    assert monitor.check() == []  # 149 of 150
    assoc = _send_open(node.port, files[-1:])
    assert monitor.check() == []  # still sending
    assoc.release()  # type: ignore[attr-defined]
    assert monitor.check() == [pydicom.dcmread(files[0]).StudyInstanceUID]


@pytest.mark.parametrize("action", ["route", "discard"])
def test_deadline_completes_even_an_open_study(node: Node, action: str) -> None:
    routed: list[str] = []
    monitor = CompletionMonitor(
        node.store,
        node.tracker,
        CompletionPolicy(quiet_period_s=3600.0, study_deadline_s=0.001, deadline_action=action),
        lambda s, uid: routed.append(uid),
    )
    assoc = _send_open(node.port, head_ct_files()[:2])
    try:
        done = monitor.check()
    finally:
        assoc.release()  # type: ignore[attr-defined]
    study = pydicom.dcmread(head_ct_files()[0]).StudyInstanceUID
    assert done == routed == ([study] if action == "route" else [])
    with node.store.session() as s:
        assert s.get(Study, study).state == "complete"  # type: ignore[union-attr]


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a real filesystem that fills up (mounting needs root, as in CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; CI runs as root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_filesystem_below_reserve_refuses_with_a700_and_recovers(small_filesystem: Path) -> None:
    n = Node(small_filesystem, reserve_bytes=6 * 1024 * 1024)
    filler = small_filesystem / "filler"
    filler.write_bytes(b"\0" * 8 * 1024 * 1024)
    files = head_ct_files()[:12]
    try:
        statuses = [int(_send(n.port, f).Status) for f in files]
        assert statuses[0] == StoreStatus.SUCCESS
        assert StoreStatus.OUT_OF_RESOURCES in statuses
        first_refusal = statuses.index(StoreStatus.OUT_OF_RESOURCES)
        assert set(statuses[first_refusal:]) == {StoreStatus.OUT_OF_RESOURCES}
        # nothing half-written: every spooled file is complete and indexed, no temp left over
        spooled = sorted(p for p in n.settings.spool_dir.rglob("*.dcm"))
        assert len(spooled) == n.count() == first_refusal
        for p in spooled:
            pydicom.dcmread(p)
        assert not list(n.settings.incoming_dir.iterdir())
        echo = subprocess.run(
            [tool("echoscu"), "-aec", "AIROUTER", "127.0.0.1", str(n.port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            capture_output=True,
        )
        assert echo.returncode == 0  # still up
        filler.unlink()  # space returns
        assert int(_send(n.port, files[-1]).Status) == StoreStatus.SUCCESS
        assert n.count() == first_refusal + 1
    finally:
        n.server.shutdown()


def _echo(port: int, calling: str = "MODALITY", called: str = "AIROUTER") -> str:
    result = subprocess.run(
        [tool("echoscu"), "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    return "accepted" if result.returncode == 0 else result.stdout + result.stderr


@pytest.mark.parametrize(
    ("settings", "calling", "called", "expected"),
    [
        ({}, "ANYONE", "WHATEVER", "accepted"),  # open by default
        ({"allowed_calling_ae_titles": ["MODALITY"]}, "MODALITY", "AIROUTER", "accepted"),
        (
            {"allowed_calling_ae_titles": ["MODALITY"]},
            "INTRUDER",
            "AIROUTER",
            "Calling AE Title Not Recognized",
        ),
        (
            {"check_called_ae_title": True},
            "MODALITY",
            "OTHERNODE",
            "Called AE Title Not Recognized",
        ),
        (
            {"allowed_source_networks": ["10.0.0.0/8"]},
            "MODALITY",
            "AIROUTER",
            "Association Request Failed",
        ),
        ({"allowed_source_networks": ["127.0.0.0/8"]}, "MODALITY", "AIROUTER", "accepted"),
    ],
)
def test_access_control(
    tmp_path: Path, settings: dict, calling: str, called: str, expected: str
) -> None:
    n = Node(tmp_path, **settings)
    try:
        assert expected in _echo(n.port, calling, called)
        assert n.server.socket.fileno() >= 0  # still listening
    finally:
        n.server.shutdown()


def test_too_many_associations_are_rejected_transiently(tmp_path: Path) -> None:
    n = Node(tmp_path, max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", n.port, ae_title="AIROUTER")
    try:
        assert held.is_established
        assert "Local Limit Exceeded" in _echo(n.port)
    finally:
        held.release()
        n.server.shutdown()


def _deeply_nested(depth: int) -> bytes:
    """A CT header with a sequence nested ``depth`` levels deep, encoded by hand (explicit VR
    little endian, undefined lengths): pydicom itself cannot write such a data set."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = pydicom.dcmread(head_ct_files()[1], stop_before_pixels=True)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.3000"
    before, after = pydicom.Dataset(), pydicom.Dataset()
    for element in ds:
        (before if element.tag < 0x00081140 else after).add(element)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta)
    out.is_little_endian, out.is_implicit_VR = True, False  # the data set's encoding
    write_dataset(out, before)
    open_sq = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff"
    open_item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close_item = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    close_sq = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    out.write((open_sq + open_item) * depth + (close_item + close_sq) * depth)
    write_dataset(out, after)
    return out.getvalue()


def test_nasty_data_sets_get_a_status_not_a_crash(node: Node, tmp_path: Path) -> None:
    """A 65535 x 65535 image with no pixel data behind it is stored as received (nothing is
    decoded at ingest); a data set nested 3000 sequences deep is refused with 0xC210."""

    huge = pydicom.dcmread(head_ct_files()[0])
    huge.Rows = huge.Columns = 65535
    huge.PixelData = b"\0\0" * 8
    huge.SOPInstanceUID = huge.file_meta.MediaStorageSOPInstanceUID = "1.2.3.65535"
    huge.save_as(tmp_path / "huge.dcm")
    assert int(_send(node.port, tmp_path / "huge.dcm").Status) == StoreStatus.SUCCESS

    (tmp_path / "deep.dcm").write_bytes(_deeply_nested(3000))
    status = _send(node.port, tmp_path / "deep.dcm")
    assert int(status.Status) == StoreStatus.CANNOT_UNDERSTAND
    assert _echo(node.port) == "accepted"


def test_required_series_complete_a_study_without_the_quiet_period(
    node: Node, tmp_path: Path
) -> None:
    from router.queue import required_series_ready
    from router.rules import load_rule_file

    rule_file = tmp_path / "r.yaml"
    rule_file.write_text(
        "rules:\n  - name: r\n    models: [ct-body]\n    require_series:\n"
        "      - {match: {Modality: CT}, min_instances: 3}\n"
    )
    rules = load_rule_file(rule_file)
    routed: list[str] = []
    monitor = CompletionMonitor(
        node.store,
        node.tracker,
        CompletionPolicy(quiet_period_s=3600.0),
        lambda s, uid: routed.append(uid),
        lambda s, uid: required_series_ready(s, uid, rules),
    )
    assoc = _send_open(node.port, head_ct_files()[:2])
    assoc.release()  # type: ignore[attr-defined]
    assert monitor.check() == []  # two of the three required instances
    assoc = _send_open(node.port, head_ct_files()[2:3])
    assoc.release()  # type: ignore[attr-defined]
    assert monitor.check() == [pydicom.dcmread(head_ct_files()[0]).StudyInstanceUID]


def test_a_rule_that_completes_on_release_needs_no_quiet_period(node: Node, tmp_path: Path) -> None:
    """complete_on_release: the study completes when the sender releases, not while the
    association is open, and only for a study the rule applies to."""
    from router.queue import required_series_ready
    from router.rules import load_rule_file

    rule_file = tmp_path / "r.yaml"
    rule_file.write_text(
        "rules:\n  - name: r\n    models: [ct-body]\n    complete_on_release: true\n"
        "    match: {Modality: CT}\n    select: {min_instances: 1}\n"
    )
    rules = load_rule_file(rule_file)
    routed: list[str] = []
    monitor = CompletionMonitor(
        node.store,
        node.tracker,
        CompletionPolicy(quiet_period_s=3600.0),
        lambda s, uid: routed.append(uid),
        lambda s, uid: required_series_ready(s, uid, rules),
    )
    files = fresh_copy(head_ct_files()[:3], tmp_path / "ct")
    assoc = _send_open(node.port, files)
    assert monitor.check() == []  # the sender is still connected
    assoc.release()  # type: ignore[attr-defined]
    assert monitor.check() == [pydicom.dcmread(files[0]).StudyInstanceUID]
    other = tmp_path / "other.yaml"  # a rule for MR only: the CT study waits for quiet
    other.write_text(rule_file.read_text().replace("Modality: CT", "Modality: MR"))
    rules[:] = load_rule_file(other)
    files = fresh_copy(head_ct_files()[3:5], tmp_path / "ct2")
    assoc = _send_open(node.port, files)
    assoc.release()  # type: ignore[attr-defined]
    assert monitor.check() == []


def test_a_sender_that_releases_wakes_completion_once(node: Node, tmp_path: Path) -> None:
    """The tracker tells completion (``on_release``) when an association that stored
    something ends, so a study that completes on release is routed without waiting for the
    next poll; an echo wakes nothing, and a failing wake-up loses nothing."""
    woken: list[int] = []
    node.tracker.on_release = lambda: woken.append(1)
    assert _echo(node.port) == "accepted"
    files = fresh_copy(head_ct_files()[:2], tmp_path / "ct")
    assoc = _send_open(node.port, files)
    assert woken == []  # still connected
    assoc.release()  # type: ignore[attr-defined]
    wait_for(lambda: woken == [1] or None, 10, "the wake-up")

    def broken() -> None:
        raise ProcessLookupError("the node is gone")

    node.tracker.on_release = broken
    files = fresh_copy(head_ct_files()[2:3], tmp_path / "ct2")
    assoc = _send_open(node.port, files)
    assoc.release()  # type: ignore[attr-defined]
    wait_for(lambda: not node.tracker.busy_studies() or None, 10, "the association to end")
    assert woken == [1] and node.count() == 3


def test_specific_character_sets_index_and_serve_names(node: Node) -> None:
    """ISO 8859 variants, ISO 2022 (Japanese, Korean), UTF-8 and GB18030 (pydicom's own
    character-set files): names are indexed decoded and served by QIDO-RS."""
    from fastapi.testclient import TestClient
    from pydicom.data import get_charset_files

    from airouter.app.web import create_app

    wado = TestClient(create_app(node.store, dict))
    files = sorted(get_charset_files("chr*.dcm"))
    assert len(files) >= 15
    expected: dict[str, str] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sent = storescu(node.port, [Path(path)], "AIROUTER", "-v")
        if not ds.get("StudyInstanceUID"):  # refused by the node, or not even sent by storescu
            assert sent.returncode != 0
            continue
        assert sent.returncode == 0, (path, sent.stderr)
        expected.setdefault(ds.StudyInstanceUID, str(ds.PatientName))
    assert len(expected) >= 10
    for study, name in expected.items():
        (row,) = wado.get(f"/dicomweb/studies?StudyInstanceUID={study}").json()
        served = row["00100010"].get("Value", [{"Alphabetic": ""}])[0]["Alphabetic"]
        assert served == name, (study, served, name)


def test_a_data_set_cut_off_mid_transfer_leaves_no_file(node: Node) -> None:
    """A C-STORE whose association aborts halfway: nothing is stored or acknowledged, and the
    partial temporary file is gone when the association ends (not at the next start)."""
    source = head_ct_files()[0]
    ds = pydicom.dcmread(source)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.maximum_pdu_size = 16384
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AIROUTER")
    assert assoc.is_established
    message = c_store_message(source)  # bytes enough for several PDUs
    context = assoc.accepted_contexts[0].context_id
    pdata = list(message.encode_msg(context, 16384))
    assert len(pdata) > 10
    for p in pdata[:8]:  # the command and a few fragments of the data set
        assoc.dul.send_pdu(p)
    incoming = node.settings.incoming_dir
    wait_for(lambda: list(incoming.glob("*.dcm")), 10, "the partial data set on disk")
    assoc.abort()
    wait_for(lambda: not list(incoming.glob("*.dcm")), 10, "the partial file removed")
    assert node.count() == 0


def test_half_sent_and_idle_connections_take_no_association_slot(tmp_path: Path) -> None:
    """50 sockets that send the first 10 bytes of an A-ASSOCIATE-RQ (announcing 172) and 200
    that send nothing, from another loopback address, held open: a modality still echoes and
    stores a 10-instance study, each within seconds, while they are held and after. Four
    association slots: without the gate, four such sockets were enough."""
    import socket
    import time

    n = Node(tmp_path, max_associations=4, association_deadline_s=3.0)
    held: list[socket.socket] = []
    try:
        partial = b"\x01\x00" + (166).to_bytes(4, "big") + b"\x00\x01\x00\x00"
        for k in range(250):
            s = socket.create_connection(
                ("127.0.0.1", n.port), timeout=5, source_address=("127.0.0.2", 0)
            )
            if k < 50:
                s.sendall(partial)
            held.append(s)
        files = head_ct_files()[:10]
        for _ in range(2):  # while they are held, and once the gate has closed them
            t0 = time.monotonic()
            assert "accepted" in _echo(n.port, "MODALITY", "AIROUTER")
            assert time.monotonic() - t0 < 5
            t0 = time.monotonic()
            result = storescu(n.port, files)
            assert result.returncode == 0, result.stderr
            assert time.monotonic() - t0 < 10
        assert n.count() == 10
    finally:
        for s in held:
            s.close()
        n.server.shutdown()


def _held_association(port: int, source: str) -> Any:
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="AIROUTER", bind_address=(source, 0))
    assert assoc.is_established
    return assoc


def c_store_message(source: Path) -> Any:
    """A C-STORE-RQ of the file ``source`` as pynetdicom encodes it, to send by hand
    (``encode_msg`` gives its P-DATA primitives)."""
    import io

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    ds = pydicom.dcmread(source, stop_before_pixels=True)
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.DataSet = io.BytesIO(source.read_bytes())
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return message


def _trickled_store(assoc: Any, stop: Any) -> None:
    """A C-STORE sent one 4 kB PDU every half second: every PDU whole and on time, the
    message never done."""
    message = c_store_message(head_ct_files()[0])
    context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
    for pdu in message.encode_msg(context.context_id, 4096):
        if stop.wait(0.5) or not assoc.is_established:
            return
        assoc.dul.send_pdu(pdu)


def test_stalled_trickled_and_oversized_pdus_free_their_slots(tmp_path: Path) -> None:
    """After association: three peers stop half-way through a PDU and one trickles a C-STORE
    (each PDU on time, the message never done), holding all four slots: a modality is
    rejected, then associates once the PDU deadline (2 s) and the message deadline (3 s) have
    closed them. A PDU announcing 4 GB is refused at its header (pynetdicom read it into
    memory whole), and no traceback is logged for any of them."""
    import logging
    import threading
    import time

    n = Node(
        tmp_path,
        max_associations=4,
        maximum_pdu_size=16384,
        pdu_deadline_s=2.0,
        message_deadline_s=3.0,
    )
    stop = threading.Event()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        stalled = [_held_association(n.port, "127.0.0.2") for _ in range(3)]
        for assoc in stalled:  # a P-DATA-TF announcing 1000 bytes, 10 sent
            assoc.dul.socket.socket.sendall(b"\x04\x00" + (1000).to_bytes(4, "big") + bytes(10))
        trickle = _held_association(n.port, "127.0.0.3")
        sender = threading.Thread(target=_trickled_store, args=(trickle, stop), daemon=True)
        sender.start()
        t0 = time.monotonic()
        assert "Local Limit Exceeded" in _echo(n.port)  # all four slots held
        wait_for(lambda: "accepted" in _echo(n.port), 8, "a slot for the modality")
        assert time.monotonic() - t0 < 8
        result = storescu(n.port, head_ct_files()[:10])
        assert result.returncode == 0, result.stderr
        assert n.count() == 10
        wait_for(lambda: not any(a.is_established for a in [*stalled, trickle]), 5, "all ended")
        assert not list(n.settings.incoming_dir.glob("*.dcm"))  # the trickled part removed

        big = _held_association(n.port, "127.0.0.4")
        raw = big.dul.socket.socket
        raw.settimeout(5)
        sent = 0
        with pytest.raises(OSError):  # the node closes it at the header
            raw.sendall(b"\x04\x00\xff\xff\xff\x00")
            for _ in range(4096):
                raw.sendall(bytes(1 << 20))
                sent += 1 << 20
        assert sent < 64 << 20, f"{sent >> 20} MB were read before the refusal"
        assert "accepted" in _echo(n.port)
    finally:
        stop.set()
        logging.getLogger().removeHandler(handler)
        n.server.shutdown()
    said = [r.getMessage() for r in records]
    assert sum("PDU not complete within 2 s" in m for m in said) == 3, said
    assert any("DIMSE message not complete within 3 s" in m for m in said), said
    assert any("PDU of 4294967040 bytes announced" in m for m in said), said
    assert not [r for r in records if r.exc_info], "a traceback was logged"


def test_one_address_holds_at_most_its_share_of_associations(tmp_path: Path) -> None:
    """Beyond max_associations_per_source, an address is rejected as pynetdicom rejects
    beyond max_associations (transient, local limit exceeded); other addresses still get in."""
    import logging

    n = Node(tmp_path, max_associations=8, max_associations_per_source=2)
    try:
        held = [_held_association(n.port, "127.0.0.5") for _ in range(2)]
        ae = AE(ae_title="GREEDY")
        ae.add_requested_context("1.2.840.10008.1.1")
        said: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r: said.append(r.getMessage())  # type: ignore[method-assign]
        logging.getLogger("pynetdicom").addHandler(handler)
        try:
            third = ae.associate("127.0.0.1", n.port, bind_address=("127.0.0.5", 0))
        finally:
            logging.getLogger("pynetdicom").removeHandler(handler)
        assert third.is_rejected
        assert any("Rejected Transient" in m for m in said), said
        assert any("Local limit exceeded" in m for m in said), said
        assert "accepted" in _echo(n.port)  # another address still associates
        for assoc in held:
            assoc.release()
        wait_for(lambda: not open_associations(n.server), 5, "the released associations")
        assert _held_association(n.port, "127.0.0.5").is_established
    finally:
        n.server.shutdown()
