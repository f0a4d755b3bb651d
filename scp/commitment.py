"""Storage commitment results (PS3.4 J, push model): the destination's N-EVENT-REPORT.

We ask a destination to commit (N-ACTION, ``airouter/senders.py``); it answers later on an
association of its own: Event Type 1, every instance committed, or 2, some failed, each
listing the transaction and the instances. Committed deliveries say so; failed ones go back
to the outbox to be sent again (and committed again).
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import select

from airouter.db import Delivery, DeliveryState, Output, Store, utcnow

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"


def handle_event_report(event: Any, store: Store) -> tuple[int, Dataset | None]:
    """EVT_N_EVENT_REPORT: record the commitment result; answer Success (0x0000) or, for what
    is not a storage commitment report, No Such SOP Class (0x0118)."""
    request = event.request
    if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
        return 0x0118, None
    info = event.event_information
    transaction = str(info.get("TransactionUID", ""))
    committed = {str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])}
    failed = {
        str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", 0x0110))
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
                delivery.commitment = "committed"
            elif sop in failed:
                delivery.commitment = "failed"
                delivery.last_status = (
                    f"storage commitment failed, Failure Reason 0x{failed[sop]:04X}"
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
    return 0x0000, None
