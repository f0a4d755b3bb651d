"""Storage commitment (PS3.4 J, push model), both halves.

We ask a destination to commit (:func:`request_commitment`, an N-ACTION on the association that
sent the instances); it answers later on an association of its own with an N-EVENT-REPORT
(:func:`handle_event_report`, bound to the node's DIMSE receiver by the composition root):
Event Type 1, every instance committed, or 2, some failed, each listing the transaction and the
instances. Committed deliveries say so; failed ones go back to the outbox to be sent again (and
committed again).
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import select

from airouter.core.db import Delivery, Output, Store, utcnow
from airouter.core.vocab import (
    CommitmentState,
    DeliveryState,
    FailureReason,
    ServiceStatus,
    status_text,
)

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH = str(StorageCommitmentPushModel)  # 1.2.840.10008.1.20.1
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP instance
N_ACTION_REQUEST_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2)

# (delivery id, what the destination said) pairs, as the senders answer.
Answers = list[tuple[int, bool, str]]


def request_commitment(
    assoc: Any,
    refs: list[tuple[int, Dataset]],
    answers: Answers,
    commitments: dict[int, str] | None,
    transaction_uid: str,
) -> Answers:
    """Ask the peer of ``assoc`` to commit to the stored instances ``refs`` (delivery id,
    data set) under ``transaction_uid``; the answers say whether it was asked and accepted,
    and ``commitments`` receives delivery id -> transaction for those it accepted."""
    request = Dataset()
    request.TransactionUID = transaction_uid
    items = []
    for _, ds in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        items.append(item)
    request.ReferencedSOPSequence = items
    try:
        status, _ = assoc.send_n_action(
            request,
            N_ACTION_REQUEST_COMMITMENT,
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_INSTANCE,
        )
        code = int(status.Status) if status and "Status" in status else None
    except (ValueError, RuntimeError) as exc:
        note = f"; storage commitment not requested: {exc}"
        return [(i, ok, answer + note if ok else answer) for i, ok, answer in answers]
    if code != ServiceStatus.SUCCESS:
        note = f"; storage commitment refused ({status_text(code)})"
        return [(i, ok, answer + note if ok else answer) for i, ok, answer in answers]
    requested = {i for i, _ in refs}
    if commitments is not None:
        commitments.update({i: str(request.TransactionUID) for i in requested})
    note = f"; storage commitment requested (transaction {request.TransactionUID})"
    return [(i, ok, answer + note if i in requested else answer) for i, ok, answer in answers]


def handle_event_report(event: Any, store: Store) -> tuple[int, Dataset | None]:
    """EVT_N_EVENT_REPORT: record the commitment result; answer Success or, for what is not a
    storage commitment report, No Such SOP Class."""
    request = event.request
    if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
        return ServiceStatus.NO_SUCH_SOP_CLASS, None
    info = event.event_information
    transaction = str(info.get("TransactionUID", ""))
    committed = {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}
    failed = {
        str(i.ReferencedSOPInstanceUID): int(
            i.get("FailureReason", FailureReason.PROCESSING_FAILURE)
        )
        for i in info.get("FailedSOPSequence", [])
    }
    with store.session() as s:
        rows = s.execute(
            select(Delivery, Output.sop_instance_uid)
            .join(Output, Output.id == Delivery.output_id)
            .where(Delivery.transaction_uid == transaction)
        ).all()
        for delivery, sop in rows:
            delivery.updated_at = utcnow()
            if sop in committed:
                delivery.commitment = CommitmentState.COMMITTED
            elif sop in failed:
                delivery.commitment = CommitmentState.FAILED
                delivery.last_status = (
                    f"storage commitment failed, Failure Reason {status_text(failed[sop])}"
                )
                delivery.state = DeliveryState.FAILED  # sent again, then committed again
                delivery.next_attempt_at = utcnow()
    store.record(
        "storage_commitment",
        {"transaction": transaction, "committed": len(committed), "failed": len(failed)},
    )
    log.info(
        "storage commitment %s: %d committed, %d failed (%d deliveries known)",
        transaction,
        len(committed),
        len(failed),
        len(rows),
    )
    return ServiceStatus.SUCCESS, None
