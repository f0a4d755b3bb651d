"""The node's own C-ECHO / C-STORE acceptor (scp/native.py) against pynetdicom as the peer
and against pynetdicom's acceptor as the reference: the same files, the same answers, and a
clear end (A-ABORT, a freed slot, no partial file) for what breaks the protocol."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation
from sqlalchemy import select

from airouter.app.shared import commitment_service
from airouter.core.db import Instance, Store
from scp.server import open_associations
from tests.peers import head_ct_files, storescu, wait_for
from tests.test_scp import Node, c_store_message

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"


@pytest.fixture
def native(tmp_path: Path) -> Iterator[Node]:
    n = _node(tmp_path / "native")
    yield n
    n.server.shutdown()


def _node(directory: Path, **settings: Any) -> Node:
    directory.mkdir(parents=True, exist_ok=True)
    return Node(directory, **settings)


def _native_count(node: Node) -> int:
    return int(node.server.airouter_native.count())  # type: ignore[attr-defined]


def _association(node: Node, *contexts: str, **ae_settings: Any) -> Any:
    ae = AE(ae_title="MODALITY")
    for key, value in ae_settings.items():
        setattr(ae, key, value)
    for uid in contexts:
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AIROUTER")
    assert assoc.is_established
    return assoc


def test_storage_associations_are_served_natively_and_commitment_by_pynetdicom(
    tmp_path: Path,
) -> None:
    """Verification and storage: the native acceptor; the node's storage commitment reports:
    pynetdicom; both counted in the node's open associations."""
    tmp_path.mkdir(exist_ok=True)
    store_db = Store(f"sqlite:///{tmp_path / 'reports.db'}")
    node = Node(tmp_path, extra=[commitment_service(store_db)])
    try:
        store = _association(node, "1.2.840.10008.1.1", CTImageStorage)
        assert _native_count(node) == 1 and not node.server.ae.active_associations
        assert store.send_c_echo().Status == 0x0000
        ae = AE(ae_title="PACS")
        ae.add_requested_context(STORAGE_COMMITMENT)
        role = build_role(STORAGE_COMMITMENT, scp_role=True)
        commit = ae.associate("127.0.0.1", node.port, ae_title="AIROUTER", ext_neg=[role])
        assert commit.is_established
        wait_for(lambda: len(node.server.ae.active_associations) == 1, 5, "pynetdicom's")
        assert _native_count(node) == 1
        assert open_associations(node.server) == 2
        store.release()
        commit.release()
        wait_for(lambda: open_associations(node.server) == 0, 5, "the released associations")
    finally:
        node.server.shutdown()


def test_both_acceptors_write_the_same_spool_files(tmp_path: Path) -> None:
    """The same instances through each acceptor: byte-identical spool files (file meta
    included) and the same index rows."""
    files = head_ct_files()[:3]
    nodes = {
        "native": _node(tmp_path / "native"),
        "pynetdicom": _node(tmp_path / "pynetdicom", receiver="pynetdicom"),
    }
    try:
        for n in nodes.values():
            result = storescu(n.port, files)
            assert result.returncode == 0, result.stderr
        spooled = {name: sorted(n.settings.spool_dir.rglob("*.dcm")) for name, n in nodes.items()}
        assert len(spooled["native"]) == len(files) == len(spooled["pynetdicom"])
        for mine, theirs in zip(spooled["native"], spooled["pynetdicom"], strict=True):
            assert mine.relative_to(tmp_path / "native") == theirs.relative_to(
                tmp_path / "pynetdicom"
            )
            assert mine.read_bytes() == theirs.read_bytes()
        rows = {}
        for name, n in nodes.items():
            with n.store.session() as s:
                rows[name] = sorted(
                    (i.sop_instance_uid, i.transfer_syntax, i.size, i.calling_ae)
                    for i in s.scalars(select(Instance))
                )
        assert rows["native"] == rows["pynetdicom"]
    finally:
        for n in nodes.values():
            n.server.shutdown()


def test_small_pdus_both_ways_and_negotiation_items(native: Node) -> None:
    """A peer with a 256-byte maximum PDU (every message in many fragments, our response
    too), an asynchronous operations window and an SCP role request: stored, answered."""
    ds = pydicom.dcmread(head_ct_files()[0])
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = 256
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 4
    window.maximum_number_operations_performed = 4
    role = build_role(CTImageStorage, scu_role=True, scp_role=True)
    assoc = ae.associate("127.0.0.1", native.port, ae_title="AIROUTER", ext_neg=[window, role])
    assert assoc.is_established
    assert _native_count(native) == 1
    status = assoc.send_c_store(ds)
    assert status.Status == 0x0000
    assoc.release()
    assert native.count() == 1


def _raw_association(node: Node) -> tuple[socket.socket, int]:
    """An association opened by pynetdicom and then driven by hand: its socket and the
    accepted context's ID (pynetdicom's threads no longer read it)."""
    assoc = _association(node, CTImageStorage)
    context = assoc.accepted_contexts[0].context_id
    assoc.dul._kill_thread = True  # its reactor stops; the socket is ours
    wait_for(lambda: not assoc.dul.is_alive(), 5, "pynetdicom's reactor to stop")
    sock = assoc.dul.socket.socket
    sock.settimeout(5)
    return sock, context


def _pdata(context: int, control: int, data: bytes) -> bytes:
    return struct.pack(">BBIIBB", 4, 0, len(data) + 6, len(data) + 2, context, control) + data


def _answer(sock: socket.socket) -> bytes:
    """The next PDU the node sends, or b'' when it closed the connection (a node that says
    nothing within the socket's timeout fails the test: TimeoutError)."""
    data = b""
    try:
        while len(data) < 6 or len(data) < 6 + struct.unpack(">I", data[2:6])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


@pytest.mark.parametrize(
    "what",
    [
        "pdv length beyond the pdu",
        "unaccepted context",
        "c-find on a storage context",
        "data set without its command",
        "unknown pdu type",
    ],
)
def test_protocol_violations_abort_and_free_the_slot(native: Node, what: str) -> None:
    """Each violation gets an A-ABORT (or a closed connection), the association's slot is
    free again, nothing is stored and no partial file stays."""
    sock, context = _raw_association(native)
    assert _native_count(native) == 1
    if what == "pdv length beyond the pdu":
        pdu = bytearray(_pdata(context, 0x03, b"\x00" * 20))
        struct.pack_into(">I", pdu, 6, 200)  # the PDV claims more than the PDU holds
        sock.sendall(pdu)
    elif what == "unaccepted context":
        sock.sendall(_pdata(context + 2, 0x03, b"\x00" * 8))
    elif what == "c-find on a storage context":
        command = struct.pack("<HHIH", 0, 0x0100, 2, 0x0020) + struct.pack(
            "<HHIH", 0, 0x0800, 2, 0x0101
        )
        sock.sendall(_pdata(context, 0x03, command))
    elif what == "data set without its command":
        sock.sendall(_pdata(context, 0x02, b"\x08\x00\x16\x00" + b"\x00" * 8))
    else:
        sock.sendall(bytes([0x09, 0, 0, 0, 0, 2, 0, 0]))
    answer = _answer(sock)
    assert answer == b"" or answer[0] == 0x07, answer[:10]  # A-ABORT
    wait_for(lambda: _native_count(native) == 0, 5, "the slot freed")
    sock.close()
    assert native.count() == 0
    assert not list(native.settings.incoming_dir.glob("*.dcm"))
    assert "accepted" in _echo_ok(native)


def _echo_ok(node: Node) -> str:
    ae = AE(ae_title="ECHO")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="AIROUTER")
    try:
        return "accepted" if assoc.is_established and assoc.send_c_echo().Status == 0 else "no"
    finally:
        assoc.release()


def test_release_mid_message_discards_the_partial_data_set(native: Node) -> None:
    """A-RELEASE-RQ after half a data set: released (A-RELEASE-RP), the partial file
    removed, nothing indexed."""
    sock, context = _raw_association(native)
    message = c_store_message(head_ct_files()[0])
    for primitive in list(message.encode_msg(context, 16384))[:6]:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        sock.sendall(pdu.encode())
    incoming = native.settings.incoming_dir
    wait_for(lambda: list(incoming.glob("*.dcm")), 5, "the partial data set on disk")
    sock.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    assert _answer(sock)[:1] == b"\x06"  # A-RELEASE-RP
    wait_for(lambda: not list(incoming.glob("*.dcm")), 5, "the partial file removed")
    sock.close()
    assert native.count() == 0


def test_shutdown_ends_open_native_associations(tmp_path: Path) -> None:
    """Stopping the server closes the associations the native acceptor holds (their threads
    end; nothing writes into a stopped node)."""
    n = Node(tmp_path)
    assoc = _association(n, CTImageStorage)
    assert _native_count(n) == 1
    n.server.shutdown()
    wait_for(lambda: _native_count(n) == 0, 5, "the association closed by the shutdown")
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established
