"""Storage commitment reports against the outbox, in the orders they can arrive in."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset

from airouter.core.db import Delivery, Job, Output, Store
from airouter.core.settings import load_settings
from airouter.core.vocab import DeliveryState
from dispatch.commitment import STORAGE_COMMITMENT_PUSH, handle_event_report
from dispatch.outbox import Dispatcher


def _outbox(database_url: str, count: int) -> tuple[Store, list[int]]:
    store = Store(database_url)
    with store.session() as s:
        job = Job(
            study_uid="1.2.3",
            series_uid="1.2.3.4",
            rule="r",
            models=[],
            outputs=["SEG"],
            destinations=["pacs"],
        )
        s.add(job)
        s.flush()
        ids = []
        for n in range(count):
            out = Output(
                job_id=job.id, kind="SEG", sop_instance_uid=f"1.2.3.4.{n}", series_uid="1", path="x"
            )
            s.add(out)
            s.flush()
            d = Delivery(
                output_id=out.id, destination="pacs", transaction_uid="9.9", commitment="pending"
            )
            s.add(d)
            s.flush()
            ids.append(d.id)
    return store, ids


def _report(committed: list[str], failed: list[str]) -> SimpleNamespace:
    info = Dataset()
    info.TransactionUID = "9.9"
    info.ReferencedSOPSequence = [_ref(uid) for uid in committed]
    if failed:
        info.FailedSOPSequence = [_ref(uid, 0x0110) for uid in failed]
    request = SimpleNamespace(AffectedSOPClassUID=STORAGE_COMMITMENT_PUSH)
    return SimpleNamespace(request=request, event_information=info)


def _ref(uid: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.66"
    item.ReferencedSOPInstanceUID = uid
    if reason is not None:
        item.FailureReason = reason
    return item


@pytest.mark.parametrize("report_first", [True, False])
def test_report_before_or_after_the_c_store_is_recorded(
    tmp_path: Path, database_url: str, report_first: bool
) -> None:
    store, (ok_id, bad_id) = _outbox(database_url, 2)
    dispatcher = Dispatcher(store, load_settings(data_dir=tmp_path).dispatch)

    def record() -> None:
        for delivery_id in (ok_id, bad_id):
            dispatcher._record(delivery_id, True, "C-STORE status 0x0000", transaction_uid="9.9")

    if not report_first:
        record()
    assert handle_event_report(_report(["1.2.3.4.0"], ["1.2.3.4.1"]), store) == (0x0000, None)
    if report_first:
        record()
    with store.session() as s:
        ok, bad = s.get(Delivery, ok_id), s.get(Delivery, bad_id)
        assert ok is not None and bad is not None
        assert (ok.state, ok.commitment) == (DeliveryState.SENT, "committed")
        # not committed: back in the outbox, to be sent (and committed) again
        assert (bad.state, bad.commitment) == (DeliveryState.FAILED, "failed")
        assert "0x0110" in (bad.last_status or "") or "commitment failed" in (bad.last_status or "")


def test_a_report_of_another_sop_class_is_refused(tmp_path: Path, database_url: str) -> None:
    store, _ = _outbox(database_url, 1)
    event = _report([], [])
    event.request.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert handle_event_report(event, store) == (0x0118, None)
