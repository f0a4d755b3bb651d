"""C-ECHO and C-STORE associations served by reading the socket directly (PS3.8 9, PS3.7 9).

pynetdicom serves each association with two threads that hand every PDU through queues and
poll them with 1 ms sleeps, and it decodes, copies and flushes every PDV in several layers of
Python: bare, storing nothing, it acknowledged 174 instances/s on one association where
DCMTK's storescp stored 298. An association that proposes only Verification and storage SOP
classes (what modalities and PACS send) is served here instead, in the thread that accepted
the connection: blocking reads with deadlines, the data set's fragments written straight to
the temporary file, the command sets read and written by hand (PS3.7 E: group 0000, implicit
VR little endian). Negotiation is pynetdicom's own (its PDU codecs and its unrestricted
storage negotiation), so both paths accept the same contexts. Anything else (storage
commitment reports, TLS) still goes to pynetdicom.

Every read has a deadline: the first byte of a PDU within the network timeout (an idle
association ends), the rest of it within ``pdu_deadline_s``, a whole DIMSE message within
``message_deadline_s``; a PDU longer than the Maximum Length we announced is refused at its
header. A violation aborts the association (A-ABORT) and removes the partial data set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import negotiate_unrestricted

from airouter.core import metrics

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# PDU types (PS3.8 9.3.1)
_ASSOCIATE_RQ, _P_DATA, _RELEASE_RQ, _ABORT = 0x01, 0x04, 0x05, 0x07
_RELEASE_RP = bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])
_ABORT_PDU = bytes([_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, 0])  # by the service provider
# DIMSE command fields (PS3.7 E.1)
_C_STORE_RQ, _C_ECHO_RQ, _C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
_C_STORE_RSP, _C_ECHO_RSP = 0x8001, 0x8030
_NO_DATA_SET = 0x0101
_LARGEST_COMMAND = 64 * 1024  # a command set is a few hundred bytes
_WRITE_BUFFER = 1 << 20


class AssociationEnded(Exception):
    """The association ends here: the reason is logged once, the peer gets an A-ABORT unless
    it is gone or aborted itself."""

    def __init__(self, reason: str, abort: bool = True, level: int = logging.WARNING) -> None:
        super().__init__(reason)
        self.abort = abort
        self.level = level


@dataclass(frozen=True)
class StoreRequest:
    """One received C-STORE: the data set as a DICOM file (meta written from the command
    and the context) and what the association knows about it."""

    path: Path
    transfer_syntax: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    calling_ae: str
    called_ae: str
    address: str
    label: str  # for log lines: calling AE, address and port
    assoc_id: int


# What answers a stored C-STORE: (status, reason); it owns the file afterwards.
StoreHandler = Callable[[StoreRequest], tuple[int, str]]
EndHandler = Callable[[int], None]


@dataclass(frozen=True)
class NativeLimits:
    """The acceptor's settings, as the SCP's settings give them."""

    ae_title: str
    maximum_pdu_size: int  # announced; 0: none (``pdu_cap`` still applies)
    pdu_cap: int
    pdu_deadline_s: float
    message_deadline_s: float
    idle_timeout_s: float | None
    max_associations: int
    require_calling_aet: Sequence[str]
    require_called_aet: bool
    implementation_class_uid: str
    implementation_version_name: str


class NativeAcceptor:
    """Serves the associations it :meth:`takes`; counts them so the limits cover both paths."""

    def __init__(
        self,
        limits: NativeLimits,
        supported_contexts: list[Any],
        foreign_sop_classes: set[str],
        incoming_dir: Path,
        on_store: StoreHandler,
        on_end: EndHandler,
    ) -> None:
        self.limits = limits
        self.supported_contexts = supported_contexts
        self.foreign_sop_classes = foreign_sop_classes  # served by pynetdicom
        self.incoming_dir = incoming_dir
        self.on_store = on_store
        self.on_end = on_end
        self._lock = threading.Lock()
        self._open: dict[int, tuple[str, socket.socket]] = {}
        self._closing = False

    def takes(self, request: bytes) -> A_ASSOCIATE | None:
        """The A-ASSOCIATE request in ``request`` (a whole PDU) if it is one this acceptor
        serves: only Verification and storage SOP classes proposed. None: pynetdicom's."""
        if len(request) < 6 or request[0] != _ASSOCIATE_RQ:
            return None
        try:
            pdu = A_ASSOCIATE_RQ()
            pdu.decode(request)
            primitive = pdu.to_primitive()
        except Exception:
            return None  # pynetdicom answers what it cannot decode, as it always has
        for cx in primitive.presentation_context_definition_list:
            if str(cx.abstract_syntax) in self.foreign_sop_classes:
                return None
        return primitive

    def count(self, address: str | None = None) -> int:
        """Open associations served here (of ``address``, or all)."""
        with self._lock:
            return sum(1 for a, _ in self._open.values() if address is None or a == address)

    def close_all(self) -> None:
        """Shut down: every open association's connection is closed (its thread ends)."""
        with self._lock:
            self._closing = True
            socks = [s for _, s in self._open.values()]
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def serve(
        self,
        sock: socket.socket,
        client_address: tuple[str, int],
        primitive: A_ASSOCIATE,
        others: int,
    ) -> None:
        """Serve one association on ``sock`` (its A-ASSOCIATE-RQ not yet consumed) until it
        is released or aborted; ``others`` counts the associations pynetdicom holds."""
        assoc = _Association(self, sock, client_address, primitive)
        with self._lock:
            if self._closing:
                return
            total = len(self._open) + others
            self._open[id(assoc)] = (client_address[0], sock)
        gauge = metrics.OPEN_ASSOCIATIONS.labels("native", "no")
        gauge.inc()
        try:
            assoc.run(over_limit=total >= self.limits.max_associations)
        finally:
            gauge.dec()
            with self._lock:
                self._open.pop(id(assoc), None)
            self.on_end(id(assoc))


class _Association:
    """One association's state machine (PS3.8 9.2): Sta6 (established) until release."""

    def __init__(
        self,
        acceptor: NativeAcceptor,
        sock: socket.socket,
        client_address: tuple[str, int],
        primitive: A_ASSOCIATE,
    ) -> None:
        self.acceptor = acceptor
        self.limits = acceptor.limits
        self.sock = sock
        self.address = client_address[0]
        self.calling_ae = str(primitive.calling_ae_title or "").strip()
        self.called_ae = str(primitive.called_ae_title or "").strip()
        self.label = f"{self.calling_ae or '?'}@{self.address}:{client_address[1]}"
        self.primitive = primitive
        self.contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract, transfer syntax)
        self.peer_max_pdu = 0  # 0: the peer set no maximum
        self._pdu_ends: float | None = None
        self._message_ends: float | None = None
        self._body = bytearray(64 * 1024)
        # the DIMSE message being received
        self._command = bytearray()
        self._fields: dict[int, bytes] | None = None
        self._context_id = 0
        self._file: Any = None
        self._path: Path | None = None
        # the temporary file of the next data set, created while the sender prepares it
        self._spare: tuple[Path, int] | None = None

    # -- association ------------------------------------------------------------------

    def run(self, over_limit: bool) -> None:
        """Answer the request, then serve DIMSE messages until release or abort."""
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kind, _ = self._read_pdu(idle=None)  # the request the gate saw complete
            if kind != _ASSOCIATE_RQ:
                raise AssociationEnded("the connection did not begin with A-ASSOCIATE-RQ")
            if not self._negotiate(over_limit):
                return
            self._serve_messages()
        except AssociationEnded as ended:
            log.log(ended.level, "assoc %s: %s", self.label, ended)
            if ended.abort:
                self._send_quietly(_ABORT_PDU)
        except OSError as exc:
            log.info("assoc %s: connection lost (%s)", self.label, exc.strerror or exc)
        except Exception:  # never a dead thread holding a slot: abort, say where
            log.exception("assoc %s: unexpected failure: aborted", self.label)
            self._send_quietly(_ABORT_PDU)
        finally:
            self._discard_partial()

    def _negotiate(self, over_limit: bool) -> bool:
        limits = self.limits
        reject: tuple[int, int, int] | None = None
        allowed = [a.strip() for a in limits.require_calling_aet]
        if allowed and self.calling_ae not in allowed:
            reject = (1, 1, 3)  # permanent, service user, calling AE title not recognised
        if limits.require_called_aet and self.called_ae != limits.ae_title.strip():
            reject = (1, 1, 7)  # called AE title not recognised
        if over_limit:
            reject = (2, 3, 2)  # transient, service provider (presentation), local limit
        if reject is not None:
            log.info("assoc %s: rejected (result %d, source %d, reason %d)", self.label, *reject)
            self._send(bytes([0x03, 0, 0, 0, 0, 4, 0, *reject]))
            return False
        rq = self.primitive
        roles: dict[Any, tuple[Any, Any]] = {}
        for item in rq.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = int(item.maximum_length_received or 0)
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        result, ac_roles = negotiate_unrestricted(
            rq.presentation_context_definition_list, self.acceptor.supported_contexts, roles
        )
        for cx in result:
            if cx.result == 0x00:
                self.contexts[int(cx.context_id or 0)] = (
                    str(cx.abstract_syntax),
                    str(cx.transfer_syntax[0]),
                )
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = result
        length = MaximumLengthNotification()
        length.maximum_length_received = limits.maximum_pdu_size
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = limits.implementation_class_uid
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = limits.implementation_version_name
        ac.user_information = [length, implementation, version, *ac_roles]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self._send(pdu.encode())
        log.info(
            "assoc %s: accepted for %s (%d of %d contexts)",
            self.label,
            self.called_ae or "?",
            len(self.contexts),
            len(result),
        )
        return True

    def _serve_messages(self) -> None:
        while True:
            kind, body = self._read_pdu(idle=self.limits.idle_timeout_s)
            if kind == _P_DATA:
                self._p_data(body)
            elif kind == _RELEASE_RQ:
                if self._fields is not None or self._command:
                    log.info("assoc %s: released mid-message", self.label)
                self._send(_RELEASE_RP)
                log.info("assoc %s: released", self.label)
                return
            elif kind == _ABORT:
                raise AssociationEnded("aborted by the peer", abort=False, level=logging.INFO)
            else:
                raise AssociationEnded(f"unexpected PDU type 0x{kind:02X}")

    # -- reading ----------------------------------------------------------------------

    def _read_pdu(self, idle: float | None) -> tuple[int, memoryview]:
        """The next PDU: its type and its body (valid until the next read)."""
        header = bytearray(6)
        self._recv_into(memoryview(header), first_wait=idle)
        kind, length = header[0], struct.unpack_from(">I", header, 2)[0]
        if length > self.limits.pdu_cap:
            raise AssociationEnded(
                f"PDU of {length} bytes announced, more than the {self.limits.pdu_cap} allowed"
            )
        if length > len(self._body):
            self._body = bytearray(length)
        view = memoryview(self._body)[:length]
        self._recv_into(view, first_wait=None)
        self._pdu_ends = None
        return kind, view

    def _recv_into(self, view: memoryview, first_wait: float | None) -> None:
        """Fill ``view``; the PDU's deadline starts at its first byte (``first_wait``: how
        long the first byte of a new PDU may take, None: forever... but for idleness)."""
        got = 0
        while got < len(view):
            now = time.monotonic()
            if self._pdu_ends is None:
                wait = first_wait
            else:
                wait = self._pdu_ends - now
                if wait <= 0:
                    raise AssociationEnded(
                        f"PDU not complete within {self.limits.pdu_deadline_s:g} s"
                    )
            self.sock.settimeout(wait)
            try:
                n = self.sock.recv_into(view[got:])
            except TimeoutError:
                if self._pdu_ends is None:
                    raise AssociationEnded(
                        f"idle for {first_wait:g} s: network timeout", level=logging.INFO
                    ) from None
                raise AssociationEnded(
                    f"PDU not complete within {self.limits.pdu_deadline_s:g} s"
                ) from None
            if n == 0:
                raise AssociationEnded("connection closed by the peer", abort=False)
            if self._pdu_ends is None:
                self._pdu_ends = time.monotonic() + self.limits.pdu_deadline_s
            got += n

    # -- DIMSE ------------------------------------------------------------------------

    def _p_data(self, body: memoryview) -> None:
        offset = 0
        while offset < len(body):
            if len(body) - offset < 6:
                raise AssociationEnded("malformed P-DATA-TF (a PDV item cut short)")
            item_length = struct.unpack_from(">I", body, offset)[0]
            if item_length < 2 or offset + 4 + item_length > len(body):
                raise AssociationEnded("malformed P-DATA-TF (a PDV item's length)")
            context_id, control = body[offset + 4], body[offset + 5]
            fragment = body[offset + 6 : offset + 4 + item_length]
            offset += 4 + item_length
            if context_id not in self.contexts:
                raise AssociationEnded(f"PDV on presentation context {context_id}, not accepted")
            self._fragment(context_id, control, fragment)

    def _fragment(self, context_id: int, control: int, fragment: memoryview) -> None:
        now = time.monotonic()
        if self._message_ends is None:
            self._message_ends = now + self.limits.message_deadline_s
        elif now > self._message_ends:
            raise AssociationEnded(
                f"DIMSE message not complete within {self.limits.message_deadline_s:g} s"
            )
        last = bool(control & 0x02)
        if control & 0x01:  # command
            if self._fields is not None:
                raise AssociationEnded("a command fragment inside a data set")
            if self._command and context_id != self._context_id:
                raise AssociationEnded("a command's fragments on two presentation contexts")
            self._context_id = context_id
            self._command += fragment
            if len(self._command) > _LARGEST_COMMAND:
                raise AssociationEnded("a command set over 64 kB")
            if last:
                self._command_complete()
            return
        if self._fields is None:
            raise AssociationEnded("a data set fragment without its command")
        if context_id != self._context_id:
            raise AssociationEnded("a data set on another presentation context than its command")
        if self._file is None:
            self._open_data_set()
        self._file.write(fragment)
        if last:
            self._data_set_complete()

    def _command_complete(self) -> None:
        fields = _parse_command(bytes(self._command))
        self._command.clear()
        command = _us(fields.get(0x00000100))
        if command is None:
            raise AssociationEnded("a command set without its Command Field")
        has_data = _us(fields.get(0x00000800)) != _NO_DATA_SET
        if command == _C_ECHO_RQ and not has_data:
            self._message_ends = None
            self._respond(_C_ECHO_RSP, fields, status=0x0000, reason="", sop_class=VERIFICATION)
            return
        if command == _C_CANCEL_RQ:
            self._message_ends = None
            return  # nothing of ours can be cancelled: each C-STORE is answered at once
        if command != _C_STORE_RQ or not has_data:
            raise AssociationEnded(f"DIMSE command 0x{command:04X} is not served here")
        self._fields = fields  # the data set follows

    def _new_file(self) -> tuple[Path, int]:
        if self._spare is not None:
            spare, self._spare = self._spare, None
            return spare
        self.acceptor.incoming_dir.mkdir(parents=True, exist_ok=True)
        path = self.acceptor.incoming_dir / f"{uuid.uuid4().hex}.dcm"
        return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def _prepare_spare(self) -> None:
        """Create the next data set's temporary file now, after the answer, while the sender
        prepares its next message (creating a file costs 0.4 ms an instance). One that
        cannot be created now is tried again when a data set needs it."""
        if self._spare is None:
            with contextlib.suppress(OSError):
                self._spare = self._new_file()

    def _open_data_set(self) -> None:
        assert self._fields is not None
        self._path, fd = self._new_file()
        self._file = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        _, transfer_syntax = self.contexts[self._context_id]
        self._file.write(
            _file_meta(
                _ui(self._fields.get(0x00000002)),
                _ui(self._fields.get(0x00001000)),
                transfer_syntax,
                self.limits.implementation_class_uid,
                self.limits.implementation_version_name,
            )
        )

    def _data_set_complete(self) -> None:
        assert self._fields is not None and self._file is not None and self._path is not None
        fields, path = self._fields, self._path
        self._file.close()
        self._file, self._path, self._fields, self._message_ends = None, None, None, None
        abstract, transfer_syntax = self.contexts[self._context_id]
        sop_class = _ui(fields.get(0x00000002)) or None
        request = StoreRequest(
            path=path,
            transfer_syntax=transfer_syntax,
            sop_class_uid=sop_class,
            sop_instance_uid=_ui(fields.get(0x00001000)) or None,
            calling_ae=self.calling_ae,
            called_ae=self.called_ae,
            address=self.address,
            label=self.label,
            assoc_id=id(self),
        )
        try:
            status, reason = self.acceptor.on_store(request)
        finally:
            path.unlink(missing_ok=True)  # refused (stored ones were moved into the spool)
        self._respond(_C_STORE_RSP, fields, status, reason, sop_class=sop_class or abstract)
        self._prepare_spare()

    def _respond(
        self, command: int, fields: dict[int, bytes], status: int, reason: str, sop_class: str
    ) -> None:
        elements: list[tuple[int, bytes]] = [
            (0x00000002, _pad_ui(sop_class)),
            (0x00000100, struct.pack("<H", command)),
            (0x00000120, fields.get(0x00000110, b"\x00\x00")[:2]),
            (0x00000800, struct.pack("<H", _NO_DATA_SET)),
            (0x00000900, struct.pack("<H", status)),
        ]
        if reason and status != 0:
            elements.append((0x00000902, _pad_text(reason[:64])))  # LO
        if command == _C_STORE_RSP:
            elements.append((0x00001000, _pad_ui(_ui(fields.get(0x00001000)))))
        self._send_command(_encode_command(elements))

    def _send_command(self, command: bytes) -> None:
        # one PDV per PDU, each within the peer's maximum (PS3.8 9.3.5)
        room = (self.peer_max_pdu - 6) if self.peer_max_pdu else len(command)
        room = max(room, 1)
        pieces = [command[i : i + room] for i in range(0, len(command), room)]
        out = bytearray()
        for i, piece in enumerate(pieces):
            control = 0x03 if i == len(pieces) - 1 else 0x01
            out += struct.pack(
                ">BBIIBB", _P_DATA, 0, len(piece) + 6, len(piece) + 2, self._context_id, control
            )
            out += piece
        self._send(bytes(out))

    # -- writing and clean-up ---------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self.sock.settimeout(self.limits.pdu_deadline_s)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise AssociationEnded(
                f"peer read nothing for {self.limits.pdu_deadline_s:g} s", abort=False
            ) from None

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except OSError:
            pass

    def _discard_partial(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            log.info("assoc %s ended mid-transfer: partial data set discarded", self.label)
        if self._spare is not None:
            with contextlib.suppress(OSError):
                os.close(self._spare[1])
            self._spare[0].unlink(missing_ok=True)
        self._file, self._path, self._spare = None, None, None


# -- encoding (PS3.5 7.1, PS3.7 E) ------------------------------------------------------


def _parse_command(data: bytes) -> dict[int, bytes]:
    """The elements of a command set (implicit VR little endian) by tag; refuses anything
    that does not parse whole."""
    fields: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if len(data) - offset < 8:
            raise AssociationEnded("malformed command set (an element cut short)")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0x0000 or length > len(data) - offset:
            raise AssociationEnded("malformed command set (not group 0000, or a length)")
        fields[element] = data[offset : offset + length]
        offset += length
    return fields


def _us(value: bytes | None) -> int | None:
    return struct.unpack("<H", value[:2])[0] if value is not None and len(value) >= 2 else None


def _ui(value: bytes | None) -> str:
    if not value:
        return ""
    return value.decode("ascii", "replace").strip("\x00 ")[:64]


def _pad_ui(uid: str) -> bytes:
    data = uid.encode("ascii", "replace")
    return data + b"\x00" if len(data) % 2 else data


def _pad_text(text: str) -> bytes:
    data = text.replace("\\", "/").encode("ascii", "replace")
    return data + b" " if len(data) % 2 else data


def _encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(
        struct.pack("<HHI", 0x0000, element, len(value)) + value for element, value in elements
    )
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _file_meta(
    sop_class: str, sop_instance: str, transfer_syntax: str, implementation: str, version: str
) -> bytes:
    """The preamble, ``DICM`` and the file meta information (PS3.10 7.1; explicit VR little
    endian) that make the received data set a DICOM file, as pynetdicom writes it."""

    def element(elem: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value

    version_bytes = version.encode("ascii", "replace")[:16]
    if len(version_bytes) % 2:
        version_bytes += b" "
    body = b"".join(
        [
            element(0x0001, b"OB", b"\x00\x01"),
            element(0x0002, b"UI", _pad_ui(sop_class)),
            element(0x0003, b"UI", _pad_ui(sop_instance)),
            element(0x0010, b"UI", _pad_ui(transfer_syntax)),
            element(0x0012, b"UI", _pad_ui(implementation)),
            element(0x0013, b"SH", version_bytes),
        ]
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body
