"""What comes back from an off-site destination is re-identified before it goes anywhere.

A destination marked ``deidentify`` got copies whose UIDs were replaced (the pairs are in the
``pseudonyms`` table, written in the transaction that queued the copies). An instance that
arrives in a study whose UID is one of those pseudonyms (an off-site model's SEG, SR or
structure set, or the copy itself) is rewritten on arrival, before it is stored:

- every UID the table knows (in any attribute, sequences and file meta included) becomes the
  original again: the study, series, instances and frame of reference it references;
- the patient and study identity (names, IDs, birth date, accession number, dates the
  profile shifted) are those of the original study, read from an instance of it;
- Patient Identity Removed and the de-identification method are removed.

UIDs the off-site system made itself (its own SEG's series and instance) are kept. An arrival
whose study is not a pseudonym costs one indexed lookup per study (negatives are cached: a
pseudonym is made before any copy carrying it leaves, so a study seen as not one never
becomes one).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import select

from airouter.core.db import Instance, Pseudonym, Store
from airouter.core.tags import read_or_none

log = logging.getLogger(__name__)

# The patient and study identity put back from the original study (PS3.3 C.7.1.1, C.7.2.1
# and what the Basic Profile changes at that level); removed when the original lacks them.
IDENTITY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "EthnicGroup",
    "PatientComments",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ReferringPhysicianName",
    "InstitutionName",
    "InstitutionAddress",
)
REMOVED = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")


class Reidentifier:
    """The ingest's hook: ``(header, read_whole, calling AE) -> the re-identified data set``
    for an arrival in a pseudonymous study, None for any other (nothing read). An arrival
    from the AE title of an off-site destination (``offsite_ae_titles``) in a study of its
    own (a system that answers in a new study) is read whole: if it references pseudonyms,
    it is re-identified too, into the original study. Raises LookupError when the original
    study is no longer held (the ingest refuses the instance: stored with a dummy identity
    under the original study, it would be a wrong patient)."""

    def __init__(
        self, store: Store, offsite_ae_titles: Iterable[str] = (), cache_size: int = 4096
    ) -> None:
        self.store = store
        self.offsite_ae_titles = {ae.strip() for ae in offsite_ae_titles}
        self.cache_size = cache_size
        self._not_pseudonyms: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(
        self,
        header: Dataset,
        read_whole: Callable[[], Dataset],
        calling_ae: str | None = None,
    ) -> Dataset | None:
        """The re-identified data set, or None when the arrival is not an answer to a copy
        sent de-identified."""
        study_uid = str(read_or_none(header, "StudyInstanceUID") or "")
        if not study_uid:  # none, or unreadable: the ingest refuses it for that
            return None
        ds = None
        original_study = self._original_study(study_uid)
        if original_study is None:
            if (calling_ae or "").strip() not in self.offsite_ae_titles:
                return None
            ds = read_whole()  # an off-site system's answer in a study of its own?
            original_study = self._referenced_study(ds)
            if original_study is None:
                return None
        with self.store.session() as s:
            mapping = dict(
                s.execute(
                    select(Pseudonym.pseudonym_uid, Pseudonym.original_uid).where(
                        Pseudonym.study_uid == original_study
                    )
                ).all()
            )
            source = s.scalar(
                select(Instance.path).where(Instance.study_uid == original_study).limit(1)
            )
        if source is None:  # deleted here since: its identity cannot be put back
            raise LookupError(
                f"study {original_study}, which this pseudonym stands for, is no longer held "
                "here: its identity cannot be put back"
            )
        mapping.setdefault(study_uid, original_study)  # a study of its own: the original
        ds = ds if ds is not None else read_whole()
        mapped = map_uids(ds, mapping)
        restore_identity(ds, dcmread(source, stop_before_pixels=True))
        for keyword in REMOVED:
            if keyword in ds:
                delattr(ds, keyword)
        log.info(
            "re-identified an arrival for study %s: %d UIDs mapped back",
            original_study,
            mapped,
        )
        return ds

    def _original_study(self, study_uid: str) -> str | None:
        """The original study ``study_uid`` is the pseudonym of (negatives cached)."""
        with self._lock:
            if study_uid in self._not_pseudonyms:
                self._not_pseudonyms.move_to_end(study_uid)
                return None
        with self.store.session() as s:
            original = s.scalar(
                select(Pseudonym.study_uid).where(Pseudonym.pseudonym_uid == study_uid)
            )
        if original is None:
            with self._lock:
                self._not_pseudonyms[study_uid] = None
                while len(self._not_pseudonyms) > self.cache_size:
                    self._not_pseudonyms.popitem(last=False)
        return original

    def _referenced_study(self, ds: Dataset) -> str | None:
        """The original study of the pseudonyms ``ds`` references, if any (one study)."""
        values = sorted({v for element in _uid_elements(ds) for v in _values(element)})
        if not values:
            return None
        with self.store.session() as s:
            studies = set()
            for k in range(0, len(values), 500):
                studies |= set(
                    s.scalars(
                        select(Pseudonym.study_uid).where(
                            Pseudonym.pseudonym_uid.in_(values[k : k + 500])
                        )
                    )
                )
        if len(studies) > 1:
            raise LookupError(
                "it references the pseudonyms of more than one study: which patient it "
                "belongs to is not clear"
            )
        return next(iter(studies), None)


def _uid_elements(ds: Dataset) -> Iterator[DataElement]:
    """Every UI element of ``ds`` with a value, sequences and file meta included."""
    meta = getattr(ds, "file_meta", None)
    for node in (ds, meta) if meta is not None else (ds,):
        for element in node.iterall():
            if element.VR == "UI" and element.value:
                yield element


def _values(element: DataElement) -> list[str]:
    value = element.value
    return [str(v) for v in value] if isinstance(value, MultiValue | list) else [str(value)]


def map_uids(ds: Dataset, mapping: dict[str, str]) -> int:
    """Replace every UID in ``ds`` (sequences and file meta too) that ``mapping`` knows;
    returns how many values were replaced."""
    count = 0
    for element in _uid_elements(ds):
        values = _values(element)
        new = [mapping.get(v, v) for v in values]
        if new != values:
            count += sum(a != b for a, b in zip(new, values, strict=True))
            element.value = new if len(new) > 1 else new[0]
    return count


def restore_identity(ds: Dataset, original: Dataset) -> None:
    """Put the patient and study identity of ``original`` into ``ds`` (removing what the
    original does not have), in the original's character set (both decoded first: what
    the off-site system wrote is written again in that character set)."""
    ds.decode()
    original.decode()
    for keyword in IDENTITY:
        if keyword in original:
            ds[original[keyword].tag] = original[keyword]
        elif keyword in ds:
            delattr(ds, keyword)
    if "SpecificCharacterSet" in original:
        ds.SpecificCharacterSet = original.SpecificCharacterSet
