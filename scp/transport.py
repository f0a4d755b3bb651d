"""Deadlines and limits on the DIMSE port's connections, below pynetdicom.

pynetdicom gives every connection an association thread and a slot at once and reads each PDU
with blocking calls and no deadline, so a peer that stops half-way through a PDU (before or
after association) holds its slot for as long as it likes, and a P-DATA-TF PDU announcing
4 GB is read into memory whole. Here, without changing pynetdicom:

- :class:`AssociationGate`: a connection waits, without a slot, until its whole
  A-ASSOCIATE-RQ has arrived (per-source and total caps on those waiting), and one address
  holds at most so many associations (the rest are rejected as pynetdicom rejects beyond its
  limit: A-ASSOCIATE-RJ, transient, local limit exceeded);
- :class:`DeadlineSocket`: once a PDU has begun, all of it must arrive within a deadline, its
  announced length may not exceed what we announced, and a send must progress within the
  same deadline; pynetdicom sees a closed connection and ends the association.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-transient (2), by the UL service-provider's
# presentation function (3), local-limit-exceeded (2): what pynetdicom answers beyond its limit
_REJECT_LOCAL_LIMIT = bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x03, 0x02])
# With no maximum announced (maximum_pdu_size 0) a PDU is still refused beyond this.
UNLIMITED_PDU_CAP = 64 << 20


class PduRefused(OSError):
    """A PDU broke a deadline or a size limit; the connection is closed."""


class AssociationGate:
    """Admits a connection to pynetdicom only once its whole A-ASSOCIATE-RQ has arrived.

    pynetdicom gives every connection an association thread and a slot at once, and reads the
    rest of a PDU with no deadline: 17 sockets that send the first 10 bytes of an
    A-ASSOCIATE-RQ, or nothing, held every slot. Here a connection waits in a gate thread of
    its own, without a slot, until the request is complete in the kernel's buffer (peeked,
    not consumed: pynetdicom then reads it at once), for at most ``deadline_s``; at most
    ``per_source`` connections of one address and ``total`` in all wait at a time, and any
    more are closed unanswered.
    """

    _POLL_S = 0.05
    LARGEST_RQ = 64 * 1024  # an A-ASSOCIATE-RQ is a few kB; more is not one

    def __init__(self, deadline_s: float, per_source: int, total: int) -> None:
        self.deadline_s = deadline_s
        self.per_source = per_source
        self.total = total
        self._lock = threading.Lock()
        self._waiting: dict[str, int] = {}

    def admit(self, sock: Any, address: str) -> bytes | None:
        """The first PDU (the A-ASSOCIATE-RQ, or another PDU the receiver answers at once),
        peeked whole in ``sock``'s buffer within the deadline; None closes it unanswered."""
        with self._lock:
            if (
                self._waiting.get(address, 0) >= self.per_source
                or sum(self._waiting.values()) >= self.total
            ):
                return None
            self._waiting[address] = self._waiting.get(address, 0) + 1
        try:
            return self._complete_request(sock)
        except OSError:
            return None
        finally:
            with self._lock:
                self._waiting[address] -= 1
                if not self._waiting[address]:
                    del self._waiting[address]

    def _complete_request(self, sock: Any) -> bytes | None:
        deadline = time.monotonic() + self.deadline_s
        needed = 6  # the PDU header: type, reserved, 4-byte length
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                return None
            data = sock.recv(self.LARGEST_RQ + 6, socket.MSG_PEEK)
            if not data:
                return None  # closed by the peer
            if len(data) >= 6 and needed == 6:
                needed = 6 + int.from_bytes(data[2:6], "big")
                if needed > self.LARGEST_RQ + 6:
                    return None
            if len(data) >= needed:
                return bytes(data[:needed])
            time.sleep(self._POLL_S)  # part of it is here: wait for the rest


class DeadlineSocket(socket.socket):
    """An accepted TCP connection whose reads are bounded per PDU (PS3.8 9.3).

    It follows the PDU framing in what pynetdicom reads: from the first byte of a PDU, the
    rest must arrive within ``deadline_s``, and a PDU whose header announces more than
    ``max_pdu`` bytes is refused at its header (the peer must not exceed the Maximum Length
    we announced). A send that cannot progress for ``deadline_s`` (a peer that stopped
    reading) fails too. Either raises :class:`PduRefused`, which pynetdicom treats as the
    connection closing (its association ends, its slot is free).
    """

    deadline_s: float = 10.0
    max_pdu: int = UNLIMITED_PDU_CAP
    label: str = "?"
    _header: bytearray
    _left: int
    _ends_at: float | None

    @classmethod
    def adopt(
        cls, sock: socket.socket, deadline_s: float, max_pdu: int, label: str
    ) -> DeadlineSocket:
        """The same connection as a DeadlineSocket (``sock`` is detached, no longer usable)."""
        wrapped = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        wrapped.deadline_s, wrapped.max_pdu, wrapped.label = deadline_s, max_pdu, label
        wrapped._header, wrapped._left, wrapped._ends_at = bytearray(), 0, None
        return wrapped

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Like :meth:`socket.socket.recv`, within the deadline of the PDU it reads."""
        now = time.monotonic()
        if self._ends_at is None:
            self._ends_at = now + self.deadline_s  # a PDU begins with this read
        left = self._ends_at - now
        if left <= 0:
            raise self._refuse(f"PDU not complete within {self.deadline_s:g} s")
        self.settimeout(left)
        try:
            data = super().recv(bufsize, flags)
        except TimeoutError:
            raise self._refuse(f"PDU not complete within {self.deadline_s:g} s") from None
        self._follow(data)
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        """Like :meth:`socket.socket.send`, failing when nothing can be sent for the deadline."""
        self.settimeout(self.deadline_s)
        try:
            return super().send(data, flags)
        except TimeoutError:
            raise self._refuse(f"peer read nothing for {self.deadline_s:g} s") from None

    def _follow(self, data: bytes) -> None:
        """Track where the PDU stream is after ``data``."""
        view = memoryview(data)
        while view:
            if self._left:  # inside a PDU's body
                step = min(self._left, len(view))
                self._left -= step
                view = view[step:]
            else:  # inside a PDU's 6-byte header
                step = min(6 - len(self._header), len(view))
                self._header += view[:step]
                view = view[step:]
                if len(self._header) < 6:
                    continue
                length = int.from_bytes(self._header[2:6], "big")
                self._header.clear()
                if length > self.max_pdu:
                    raise self._refuse(
                        f"PDU of {length} bytes announced, more than the {self.max_pdu} allowed"
                    )
                self._left = length
            if not self._left and not self._header:
                self._ends_at = None  # the PDU is complete: the next one has its own deadline

    def _refuse(self, reason: str) -> PduRefused:
        log.warning("connection %s closed: %s", self.label, reason)
        return PduRefused(reason)


class _QuietRefusals(logging.Filter):
    """pynetdicom logs the traceback of every read that fails; ours was said in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], PduRefused))


def _quiet_pynetdicom() -> None:
    dul = logging.getLogger("pynetdicom.dul")
    if not any(isinstance(f, _QuietRefusals) for f in dul.filters):
        dul.addFilter(_QuietRefusals())


def guard_connections(
    server: ThreadedAssociationServer,
    gate: AssociationGate,
    pdu_deadline_s: float,
    max_pdu: int,
    per_source: int,
    established: Callable[[str], int],
    native: Callable[[socket.socket, tuple[str, int], bytes], bool] | None = None,
) -> None:
    """Put ``gate`` and the PDU deadlines in front of the server's per-connection work (run
    in its own thread, before pynetdicom sees the connection). ``established(address)`` counts
    that address's associations. ``native(sock, address, request)`` may serve the connection
    itself (True) once its A-ASSOCIATE-RQ is here; otherwise pynetdicom does."""
    finish = server.finish_request
    _quiet_pynetdicom()

    def finish_request(request: Any, client_address: Any) -> None:
        address = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if not isinstance(request, socket.socket) or isinstance(request, ssl.SSLSocket):
            finish(request, client_address)  # TLS: its handshake has its own timeout
            return
        first = gate.admit(request, address)
        if first is None:
            log.info("connection from %s closed: no A-ASSOCIATE-RQ in time", address)
            server.shutdown_request(request)
            return
        if established(address) >= per_source:
            log.warning(
                "association from %s rejected: it holds %d associations already",
                address,
                per_source,
            )
            _reject(request)
            server.shutdown_request(request)
            return
        if (
            native is not None
            and isinstance(client_address, tuple)
            and native(request, client_address, first)
        ):
            return
        label = f"{address}:{client_address[1]}" if isinstance(client_address, tuple) else address
        finish(DeadlineSocket.adopt(request, pdu_deadline_s, max_pdu, label), client_address)

    server.finish_request = finish_request  # type: ignore[method-assign]


def _reject(sock: socket.socket) -> None:
    """Consume the A-ASSOCIATE-RQ and answer A-ASSOCIATE-RJ (transient, local limit)."""
    try:
        sock.settimeout(1.0)
        sock.recv(AssociationGate.LARGEST_RQ + 6)
        sock.sendall(_REJECT_LOCAL_LIMIT)
    except OSError:
        pass
