"""Keeping patient identity out of logs and audit answers unless ``log_phi`` is on.

Our own code identifies work by job id and UIDs; the risk is text we do not write ourselves: a
library warning that quotes a header value (highdicom prints a person name it finds odd), an
exception message that quotes a date. So, with ``log_phi`` off:

- :class:`PhiRegistry` remembers the identifying values the node has seen (patient names and
  their components, IDs, birth dates; bounded) and :meth:`PhiRegistry.redact` replaces them in
  any text;
- :class:`PhiFilter`, on every log handler, redacts each record's message and traceback, and
  also every quoted string in records of the DICOM libraries (values we never saw);
- the state store redacts event details and job errors before it writes them, so the API
  answers that do not exist to show patient data (events, jobs, rules) cannot show them.

Which attributes count as identifying is :func:`is_identifying` (the Patient module's group
plus the other attributes of PS3.15's Basic Profile that name people or institutions).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from pydicom.datadict import tag_for_keyword

REDACTED = "[redacted]"
# Identifying attributes outside the Patient group (0010,xxxx), by keyword.
_IDENTIFYING = frozenset(
    {
        "AccessionNumber",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "OperatorsName",
        "RequestingPhysician",
        "InstitutionName",
        "InstitutionAddress",
        "StudyID",
        "OtherPatientIDs",
        "OtherPatientNames",
    }
)
# The values remembered of each instance.
_REMEMBERED = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs")
_MIN_CHARS = 3  # shorter values identify nobody and would blank out ordinary words
# Any quoted text, however long: pydicom quotes a whole corrupt value, which can swallow the
# elements after it (the patient's name among them).
_QUOTED = re.compile(r"""(["'])(?:(?!\1).)+\1""", re.S)
_LIBRARIES = ("highdicom", "pydicom", "py.warnings")  # they quote attribute values


def is_identifying(keyword: str) -> bool:
    """Whether a DICOM attribute's value identifies a patient (or a person caring for one)."""
    if keyword in _IDENTIFYING:
        return True
    tag = tag_for_keyword(keyword)
    return tag is not None and (tag >> 16) == 0x0010


class PhiRegistry:
    """The identifying values seen recently, and their redaction from text."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self.enabled = False  # on when log_phi is off
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, values: Iterable[object]) -> None:
        """Remember values (names are remembered whole and by component)."""
        if not self.enabled:
            return
        with self._lock:
            for value in values:
                for text in _forms(value):
                    self._values[text] = None
                    self._values.move_to_end(text)
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)

    def remember_dataset(self, ds: Any) -> None:
        """Remember the identifying values of a data set's header."""
        found = []
        for keyword in _REMEMBERED:
            try:
                found.append(ds.get(keyword))
            except Exception:  # a value pydicom cannot convert: nothing to remember
                continue
        self.remember(found)

    def redact(self, text: str) -> str:
        """``text`` with every remembered value replaced (longest first)."""
        if not self.enabled or not text:
            return text
        with self._lock:
            hits = [v for v in self._values if v in text]
        for value in sorted(hits, key=len, reverse=True):
            text = text.replace(value, REDACTED)
        return text


def _forms(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return [f for v in value for f in _forms(v)]  # type: ignore[attr-defined]
    text = str(value).strip()
    forms = {text}
    if "^" in text or "=" in text:  # a person name: its components too
        forms.update(p.strip() for p in re.split(r"[\^=]", text))
    if re.fullmatch(r"\d{8}", text):  # a DA: also as dates are often printed
        forms.add(f"{text[:4]}-{text[4:6]}-{text[6:]}")
    return [f for f in forms if len(f) >= _MIN_CHARS]


REGISTRY = PhiRegistry()  # one per process, like the logging it guards


class PhiFilter(logging.Filter):
    """Redacts identifying values from every record that passes a handler."""

    def __init__(self, registry: PhiRegistry = REGISTRY) -> None:
        super().__init__()
        self.registry = registry

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message (and traceback) without PHI; never drops a record."""
        message = self.registry.redact(record.getMessage())
        if record.name.startswith(_LIBRARIES):
            message = _QUOTED.sub(lambda m: f"{m.group(1)}{REDACTED}{m.group(1)}", message)
        record.msg, record.args = message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.registry.redact(record.exc_text)
        return True


def guard(log_phi: bool, registry: PhiRegistry = REGISTRY) -> None:
    """Install (``log_phi`` off) or remove (on) the redaction on every root log handler, and
    tell the registry whether to remember and redact. Library warnings go through logging."""
    registry.enabled = not log_phi
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, PhiFilter)]:
            handler.removeFilter(old)
        if not log_phi:
            handler.addFilter(PhiFilter(registry))
