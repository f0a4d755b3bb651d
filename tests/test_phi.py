"""``log_phi`` off: identifying values stay out of log lines, events and rule explanations."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from airouter.core.db import Store
from airouter.core.phi import REDACTED, PhiFilter, PhiRegistry, guard, is_identifying
from router.engine import SeriesInfo, StudyContext, explain
from router.rules import parse_rules


@pytest.fixture
def registry() -> PhiRegistry:
    r = PhiRegistry(capacity=100)
    r.enabled = True
    return r


@pytest.fixture
def captured(registry: PhiRegistry) -> Iterator[io.StringIO]:
    """A handler as the node's: a root handler with the filter."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(PhiFilter(registry))
    root = logging.getLogger()
    root.addHandler(handler)
    yield out
    root.removeHandler(handler)


def _header() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Sentinel^Zacharias"
    ds.PatientID = "ZZ-4711"
    ds.PatientBirthDate = "19610907"
    return ds


def test_values_seen_are_redacted_from_messages_and_tracebacks(
    registry: PhiRegistry, captured: io.StringIO
) -> None:
    registry.remember_dataset(_header())
    log = logging.getLogger("airouter.test")
    log.warning("patient %s born %s", "Sentinel^Zacharias", "1961-09-07")
    try:
        raise ValueError("bad value 'ZZ-4711' for Zacharias")
    except ValueError:
        log.exception("job 7 failed")
    text = captured.getvalue()
    for value in ("Sentinel", "Zacharias", "ZZ-4711", "1961-09-07", "19610907"):
        assert value not in text, value
    assert text.count(REDACTED) >= 4 and "job 7 failed" in text
    assert "ValueError" in text  # the traceback itself is kept


def test_library_warnings_lose_their_quoted_values_even_unseen(captured: io.StringIO) -> None:
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn('The string "Neverseen" is unlikely to be a name', UserWarning, 2)
            swallowed = "1.2.3" + "\x00" * 300 + "PN\x10\x00Longvalue^Swallowed"
            warnings.warn(f'Invalid value for VR UI: "{swallowed}"', UserWarning, 2)
    finally:
        logging.captureWarnings(False)
    text = captured.getvalue()
    assert "Neverseen" not in text and "unlikely to be a name" in text
    assert "Swallowed" not in text and "Invalid value for VR UI" in text


def test_with_log_phi_on_nothing_is_redacted(tmp_path: Path) -> None:
    registry = PhiRegistry()
    handler = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        guard(True, registry)
        registry.remember_dataset(_header())
        assert registry.redact("Sentinel^Zacharias") == "Sentinel^Zacharias"
        assert not [f for f in handler.filters if isinstance(f, PhiFilter)]
        guard(False, registry)
        assert [f for f in handler.filters if isinstance(f, PhiFilter)]
        registry.remember_dataset(_header())
        assert registry.redact("x Sentinel^Zacharias y") == f"x {REDACTED} y"
    finally:
        root.removeHandler(handler)
        guard(True, registry)
        logging.captureWarnings(False)


def test_short_values_are_not_remembered(registry: PhiRegistry) -> None:
    ds = Dataset()
    ds.PatientID = "7"
    ds.PatientName = "Li^Bo"
    registry.remember_dataset(ds)
    assert registry.redact("job 7 for Li^Bo: 7 instances") == f"job 7 for {REDACTED}: 7 instances"


def test_event_details_are_redacted_when_written(tmp_path: Path) -> None:
    from airouter.core import phi

    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    was = phi.REGISTRY.enabled
    phi.REGISTRY.enabled = True
    try:
        phi.REGISTRY.remember_dataset(_header())
        store.record("store_refused", "cannot decode 'ZZ-4711'")
    finally:
        phi.REGISTRY.enabled = was
    with store.session() as s:
        from sqlalchemy import select

        from airouter.core.db import Event

        assert s.scalar(select(Event.detail)) == f"cannot decode '{REDACTED}'"


def test_rule_explanations_withhold_identifying_values() -> None:
    assert is_identifying("PatientSex") and is_identifying("AccessionNumber")
    assert not is_identifying("Modality") and not is_identifying("SliceThickness")
    rules = parse_rules(
        "rules:\n"
        "  - {name: adults, models: [m], when: {PatientAge: {range: {min: 18}}}}\n"
        "  - {name: ct, models: [m], match: {Modality: MR}}\n",
        "test.yaml",
    )
    tags = {"PatientAge": "012Y", "Modality": "CT", "ImageOrientationPatient": [1, 0, 0, 0, 1, 0]}
    ctx = StudyContext([SeriesInfo("1.2", tags, 10)])
    hidden = {v.rule.name: v.reason for v in explain(ctx, rules)}
    assert "012Y" not in hidden["adults"] and "withheld" in hidden["adults"]
    assert "'CT'" in hidden["ct"]  # not identifying: shown
    shown = {v.rule.name: v.reason for v in explain(ctx, rules, show_identifying=True)}
    assert "012Y" in shown["adults"]
