"""De-identified copies for destinations outside the hospital (PS3.15 Annex E).

The Basic Application Level Confidentiality Profile is applied in two steps, both by
maintained libraries rather than a hand list:

1. dicognito gives the pseudonyms: names, IDs, addresses and institutions replaced by dummy
   values, every UID replaced consistently under a seed (the same original, the same
   pseudonym, in every process), dates shifted by an offset the seed fixes (one per
   destination here: the intervals between a patient's studies hold);
2. the profile's action table (PS3.15 Table E.1-1, as dicom-anonymizer ships it for the 2026c
   edition) is applied at every level of nesting: an attribute whose action is X is removed
   (a sequence with all it holds); of what dicognito left as it was, one whose action is
   X/Z, X/D or X/Z/D is removed, one whose action is Z (or Z/D) is emptied, one whose action
   is D gets a dummy value; what dicognito replaced keeps its dummy (Z and D allow one).
   Descriptions and comments go (no Retain Description Option), except the node's own
   structure names and SR content in what it produced (``produced``: they come from the
   site template and the models, never from a patient);

then:

- private attributes are removed (the profile's default; no Retain Safe Private option);
- without Retain Longitudinal Temporal Information, every date and time is emptied;
- with Retain Device Identity, the device attributes dicognito replaced are put back;
- Patient Identity Removed is YES, and the De-identification Method Code Sequence lists the
  profile and its options (CID 7050).

Every UID of the original that the copy holds in its place is returned with its pseudonym,
for the database: what comes back referencing the pseudonyms is mapped to the originals.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence

from airouter.core.settings import DeidentifySettings

# CID 7050 De-identification Method
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
RETAIN_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
RETAIN_DEVICE = ("113109", "Retain Device Identity Option")
DEVICE_KEYWORDS = ("StationName", "DeviceSerialNumber", "DeviceUID", "ManufacturerModelName")
# modalities whose images often carry burned-in text (PS3.15 E.1.1: the profile cannot
# remove it; only a human or OCR can say there is none)
BURNS_IN = {"US", "SC", "XA", "ES", "XC", "GM", "SM", "OT", "RF", "DX", "CR"}


def burned_in_refusal(ds: Dataset, settings: DeidentifySettings) -> str | None:
    """Why the series of ``ds`` must not leave de-identified (None: it may)."""
    if settings.allow_burned_in:
        return None
    said = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if said == "YES":
        return "Burned In Annotation is YES: the text in the pixels would leave identified"
    if not said and modality in BURNS_IN:
        return (
            f"Burned In Annotation is not given and {modality} images often burn text in: "
            "refused (deidentify.allow_burned_in allows it)"
        )
    return None


def _uids(ds: Dataset) -> Iterator[tuple[tuple[object, ...], str]]:
    """(path, value) of every UI element, sequences included, in document order."""

    def walk(node: Dataset, path: tuple[object, ...]) -> Iterator[tuple[tuple[object, ...], str]]:
        for element in node:
            if element.VR == "SQ":
                for i, item in enumerate(element.value):
                    yield from walk(item, (*path, element.tag, i))
            elif element.VR == "UI" and element.value:
                values = element.value if element.VM > 1 else [element.value]
                for j, value in enumerate(values):
                    yield (*path, element.tag, j), str(value)

    yield from walk(ds, ())


def _table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    """PS3.15 Table E.1-1: tag -> the Basic Profile's action (X; X/ for X/Z, X/D, X/Z/D;
    Z for Z and Z/D; D), and the repeating groups (curves, overlays) as (group, element,
    masks, action). U and X/Z/U* are the UIDs, which dicognito replaced."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    database = dicom_anonymization_database_selector("dicomfields_2026c")
    strictest = {
        "X_TAGS": "X",
        "X_Z_TAGS": "X/",
        "X_D_TAGS": "X/",
        "X_Z_D_TAGS": "X/",
        "Z_TAGS": "Z",
        "Z_D_TAGS": "Z",
        "D_TAGS": "D",
    }
    tags: dict[int, str] = {}
    groups: list[tuple[int, int, int, int, str]] = []
    for category, action in strictest.items():
        for entry in database[category]:
            if len(entry) == 2:
                tags[entry[0] << 16 | entry[1]] = action
            else:
                groups.append((*entry, action))
    return tags, groups


_TABLE: tuple[dict[int, str], list[tuple[int, int, int, int, str]]] | None = None
# the node's own objects: their structure names and SR content are the template's and the
# models', not the patient's (the profile would empty or replace them)
PRODUCED_KEPT = {0x30060026, 0x30060002, 0x0040A730}  # ROIName, StructureSetLabel, ContentSequence


def _action(tag: int) -> str | None:
    global _TABLE
    if _TABLE is None:
        _TABLE = _table()
    tags, groups = _TABLE
    action = tags.get(tag)
    if action is not None:
        return action
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, group_mask, element_mask, grouped in groups:
        if group & group_mask == g & group_mask and element & element_mask == e & element_mask:
            return grouped
    return None


def _dummy(element: DataElement) -> object:
    if element.VR == "SQ":
        return DicomSequence([])
    if element.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC", "CS", "AE"):
        return "ANONYMIZED" if element.VR != "CS" else "ANON"
    return None


def _apply_table(node: Dataset, original: Dataset | None, produced: bool) -> None:
    """The Basic Profile's actions on what dicognito left unchanged (see the module)."""
    for element in list(node):
        tag = int(element.tag)
        before = original.get(element.tag) if original is not None else None
        unchanged = before is not None and before.value == element.value
        action = None if produced and tag in PRODUCED_KEPT else _action(tag)
        # X: removed; X/Z, X/D, X/Z/D: removed unless dicognito gave it a dummy value
        if action == "X" or (action == "X/" and (unchanged or before is None)):
            del node[element.tag]
            continue
        if action == "Z" and unchanged and element.value not in (None, "", b""):
            element.value = DicomSequence([]) if element.VR == "SQ" else None
            continue
        if action == "D" and unchanged and element.value not in (None, "", b""):
            dummy = _dummy(element)
            if dummy is not None:
                element.value = dummy
                continue
        if element.VR == "SQ":
            originals = before.value if before is not None and before.VR == "SQ" else []
            for i, item in enumerate(element.value):
                _apply_table(item, originals[i] if i < len(originals) else None, produced)


def _dates_emptied(node: Dataset) -> None:
    for element in node:
        if element.VR == "SQ":
            for item in element.value:
                _dates_emptied(item)
        elif element.VR in ("DA", "TM", "DT") and element.value:
            element.value = ""


def deidentify(
    ds: Dataset, settings: DeidentifySettings, produced: bool = False
) -> tuple[Dataset, list[tuple[str, str]]]:
    """The de-identified copy of ``ds`` and its (original, pseudonym) UID pairs
    (``produced``: an object the node wrote, see the module)."""
    from dicognito.anonymizer import Anonymizer

    out = copy.deepcopy(ds)  # ``ds`` stays as it was: what dicognito changed is told by it
    out.remove_private_tags()
    Anonymizer(seed=settings.seed).anonymize(out)
    _apply_table(out, ds, produced)
    before, after = dict(_uids(ds)), dict(_uids(out))
    pairs = sorted(
        {(original, after[path]) for path, original in before.items()
         if path in after and after[path] != original}
    )  # fmt: skip
    if not settings.retain_longitudinal_dates:
        _dates_emptied(out)
    if settings.retain_device_identity:
        for keyword in DEVICE_KEYWORDS:
            if keyword in ds:
                out[ds[keyword].tag] = copy.deepcopy(ds[keyword])
    out.PatientIdentityRemoved = "YES"
    methods = [BASIC_PROFILE]
    if settings.retain_longitudinal_dates:
        methods.append(RETAIN_DATES)
    if settings.retain_device_identity:
        methods.append(RETAIN_DEVICE)
    out.DeidentificationMethod = "PS3.15 Basic Profile: dicognito + Table E.1-1 (2026c)"
    items = []
    for value, meaning in methods:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    out.DeidentificationMethodCodeSequence = DicomSequence(items)
    if hasattr(ds, "file_meta"):  # a new meta: the original's names the sender's AE titles
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.file_meta.get("MediaStorageSOPClassUID", out.SOPClassUID)
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
        out.file_meta = meta
    return out, pairs
