"""De-identification and re-identification, unit by unit (the end-to-end path with real peers
is tests/test_deidentify.py): the profile's table at every nesting level, consistent
pseudonyms, the burned-in refusals (destinations and off-site model cards), the UIDs and the
identity mapped back."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from airouter.core.db import Delivery, Instance, Job, Output, Pseudonym, Series, Store, Study
from airouter.core.pseudonyms import Reidentifier, map_uids
from airouter.core.settings import DeidentifySettings, DispatchSettings, FolderNode
from airouter.core.vocab import Action, DeliveryState, OutputKind, StoreStatus
from airouter.jobs.pipeline import offsite_refusal
from dispatch.deidentify import burned_in_refusal, deidentify
from dispatch.outbox import Outbox
from inference.cards import load_cards
from scp.ingest import Ingest, Received
from tests.peers import ROOT, head_ct_files


def _ct() -> Dataset:
    ds = pydicom.dcmread(head_ct_files()[0])
    ds.file_meta.SourceApplicationEntityTitle = "ELSEWHERE_CT1"
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "ROE^RICHARD", "PID-123", "A-77"
    ds.PatientBirthDate, ds.InstitutionName = "19500101", "GENERAL HOSPITAL"
    ds.ImageComments = "Richard Roe, PID-123"
    item = Dataset()
    item.PatientName, item.ProtocolName = "ROE^RICHARD", "head for ROE"
    ds.ReferencedImageSequence[0].PatientName = "ROE^RICHARD"  # a name deep in a sequence
    ds.ProtocolName = "HEAD ROE"
    return ds


def test_the_profile_reaches_into_sequences_and_keeps_pseudonyms_consistent() -> None:
    ds = _ct()
    settings = DeidentifySettings(seed="s1")
    copy, pairs = deidentify(ds, settings)
    texts = [str(e.value) for e in copy.iterall() if e.VR not in ("OB", "OW", "SQ")]
    for needle in ("ROE", "PID-123", "A-77", "19500101", "GENERAL HOSPITAL", "Richard"):
        assert not any(needle in t for t in texts), needle
    assert "ImageComments" not in copy and "ProtocolName" not in copy
    originals = dict(pairs)
    assert originals[str(ds.StudyInstanceUID)] == copy.StudyInstanceUID
    assert originals[str(ds.SOPInstanceUID)] == copy.SOPInstanceUID
    assert copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in copy.file_meta  # the sender's AE title
    referenced = str(ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
    assert copy.ReferencedImageSequence[0].ReferencedSOPInstanceUID == originals[referenced]
    again, _ = deidentify(_ct(), settings)
    assert again.StudyInstanceUID == copy.StudyInstanceUID  # the same seed, the same pseudonym
    other, _ = deidentify(_ct(), DeidentifySettings(seed="s2"))
    assert other.StudyInstanceUID != copy.StudyInstanceUID
    assert ds.PatientName == "ROE^RICHARD"  # the original is untouched


def test_options_empty_dates_or_keep_the_device() -> None:
    ds = _ct()
    undated, _ = deidentify(ds, DeidentifySettings(retain_longitudinal_dates=False))
    assert not undated.StudyDate and not undated.get("ContentDate")
    codes = {i.CodeValue for i in undated.DeidentificationMethodCodeSequence}
    assert codes == {"113100"}
    device, _ = deidentify(ds, DeidentifySettings(retain_device_identity=True))
    assert device.StationName == ds.StationName
    assert "113109" in {i.CodeValue for i in device.DeidentificationMethodCodeSequence}
    plain, _ = deidentify(ds, DeidentifySettings())
    assert plain.get("StationName") != ds.StationName


@pytest.mark.parametrize(
    ("modality", "burned_in", "refused"),
    [("CT", "", False), ("CT", "YES", True), ("US", "", True), ("US", "NO", False),
     ("SC", "", True), ("MR", "NO", False)],
)  # fmt: skip
def test_burned_in_annotation_refusals(modality: str, burned_in: str, refused: bool) -> None:
    ds = Dataset()
    ds.Modality = modality
    if burned_in:
        ds.BurnedInAnnotation = burned_in
    assert (burned_in_refusal(ds, DeidentifySettings()) is not None) is refused
    assert burned_in_refusal(ds, DeidentifySettings(allow_burned_in=True)) is None


def test_an_offsite_model_card_refuses_burned_in_series_unless_the_rule_allows() -> None:
    cards = load_cards(ROOT / "config" / "models")
    name = next(iter(cards))
    cards[name] = cards[name].model_copy(update={"deidentify": True})
    ds = Dataset()
    ds.Modality, ds.BurnedInAnnotation = "CT", "YES"
    job = Job(action=Action.RUN, models=[name], options={})
    assert f"off-site model {name}" in (offsite_refusal(job, cards, ds) or "")
    job.options = {"allow_burned_in": True}
    assert offsite_refusal(job, cards, ds) is None
    ds.BurnedInAnnotation = "NO"
    assert offsite_refusal(Job(action=Action.RUN, models=[name], options={}), cards, ds) is None


def test_map_uids_replaces_every_known_uid_and_counts() -> None:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SOPInstanceUID = "2.1", "9.9"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "2.2"
    ds.ReferencedImageSequence = [item]
    ds.RelatedFrameOfReferenceUID = ["2.3", "9.8"]
    assert map_uids(ds, {"2.1": "1.1", "2.2": "1.2", "2.3": "1.3"}) == 3
    assert ds.StudyInstanceUID == "1.1" and ds.SOPInstanceUID == "9.9"
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == "1.2"
    assert list(ds.RelatedFrameOfReferenceUID) == ["1.3", "9.8"]


def test_the_reidentifier_maps_back_and_restores_the_identity(
    database_url: str, tmp_path: Path
) -> None:
    store = Store(database_url)
    original = _ct()
    original_path = tmp_path / "original.dcm"
    original.save_as(original_path)
    copy, pairs = deidentify(original, DeidentifySettings(seed="x"))
    with store.session() as s:
        s.add(Study(study_uid=original.StudyInstanceUID))
        s.flush()
        s.add(Series(series_uid=original.SeriesInstanceUID, study_uid=original.StudyInstanceUID))
        s.flush()
        s.add(
            Instance(
                sop_instance_uid=original.SOPInstanceUID, sop_class_uid=original.SOPClassUID,
                series_uid=original.SeriesInstanceUID, study_uid=original.StudyInstanceUID,
                path=str(original_path), size=1, instance_number=1,
                transfer_syntax=str(original.file_meta.TransferSyntaxUID),
            )
        )  # fmt: skip
        for old, new in pairs:
            s.add(
                Pseudonym(
                    pseudonym_uid=new, original_uid=old, destination="offsite",
                    study_uid=original.StudyInstanceUID,
                )
            )  # fmt: skip
    reidentify = Reidentifier(store)
    unrelated = Dataset()
    unrelated.StudyInstanceUID = "1.2.3.4"
    assert reidentify(unrelated, lambda: pytest.fail("read an unrelated arrival")) is None
    pseudonym_sop = str(copy.SOPInstanceUID)
    back = reidentify(copy, lambda: copy)  # (in place: read_whole gives the copy itself)
    assert back is not None
    assert back.StudyInstanceUID == original.StudyInstanceUID
    assert back.SOPInstanceUID == original.SOPInstanceUID
    assert back.FrameOfReferenceUID == original.FrameOfReferenceUID
    assert back.PatientName == "ROE^RICHARD" and back.PatientID == "PID-123"
    assert back.AccessionNumber == "A-77" and back.StudyDate == original.StudyDate
    assert "PatientIdentityRemoved" not in back
    # an answer in a study of its own, citing a copy: taken only from the off-site AE title
    answer = Dataset()
    answer.StudyInstanceUID, answer.SOPInstanceUID = "2.25.999", "2.25.998"
    cited = Dataset()
    cited.ReferencedSOPInstanceUID = pseudonym_sop
    answer.ReferencedImageSequence = [cited]
    offsite = Reidentifier(store, ["OFFSITE"])
    assert offsite(answer, lambda: pytest.fail("read an arrival from elsewhere"), "CT1") is None
    joined = offsite(answer, lambda: answer, "OFFSITE ")
    assert joined is not None and joined.StudyInstanceUID == original.StudyInstanceUID
    assert joined.ReferencedImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert joined.SOPInstanceUID == "2.25.998" and joined.PatientID == "PID-123"


def test_the_outbox_queues_copies_and_keeps_each_pseudonym_once(
    database_url: str, tmp_path: Path
) -> None:
    """Two jobs forwarding one study to an off-site folder: one copy per job (the same
    pseudonyms: the seed is the destination's), each pseudonym stored once, on SQLite and on
    PostgreSQL; a burned-in instance gets a dead entry and no copy."""
    store = Store(database_url)
    original = _ct()
    path = tmp_path / "original.dcm"
    original.save_as(path)
    burned = _ct()
    burned.SOPInstanceUID, burned.BurnedInAnnotation = "1.2.826.0.1.3680043.2.1143.77", "YES"
    burned_path = tmp_path / "burned.dcm"
    burned.save_as(burned_path)
    folder = FolderNode(kind="folder", path=tmp_path / "out", deidentify=DeidentifySettings())
    outbox = Outbox(tmp_path / "var" / "archive", DispatchSettings(destinations={"off": folder}))
    with store.session() as s:
        s.add(Study(study_uid=original.StudyInstanceUID))
        s.flush()
        for _ in range(2):
            job = Job(
                study_uid=original.StudyInstanceUID, series_uid=original.SeriesInstanceUID,
                rule="to-off", action=Action.FORWARD, models=[], outputs=[],
                destinations=["off"],
            )  # fmt: skip
            s.add(job)
            s.flush()
            for source in (path, burned_path):
                output = Output(
                    job_id=job.id, kind=OutputKind.ORIGINAL, path=str(source),
                    sop_instance_uid="x", series_uid=original.SeriesInstanceUID,
                )  # fmt: skip
                s.add(output)
                s.flush()
                outbox.add_deliveries(s, job, output)
    with store.session() as s:
        rows = s.execute(select(Delivery, Output).join(Output)).all()
        pseudonyms = s.scalars(select(Pseudonym)).all()
    sent = [(d, o) for d, o in rows if d.state is DeliveryState.PENDING]
    dead = [d for d, _ in rows if d.state is DeliveryState.DEAD]
    assert len(sent) == 2 and len(dead) == 2
    assert all("Burned In Annotation is YES" in (d.last_status or "") for d in dead)
    assert all(d.destination == "off" for d in dead)
    copies = {o.path for _, o in sent}
    assert len(copies) == 1 and "/deidentified/off/" in next(iter(copies))
    written = pydicom.dcmread(next(iter(copies)))
    assert written.PatientIdentityRemoved == "YES"
    assert len({p.pseudonym_uid for p in pseudonyms}) == len(pseudonyms) > 0
    by_pseudonym = {p.pseudonym_uid: p.original_uid for p in pseudonyms}
    assert by_pseudonym[written.StudyInstanceUID] == original.StudyInstanceUID
    assert by_pseudonym[written.SOPInstanceUID] == original.SOPInstanceUID
    assert {p.study_uid for p in pseudonyms} == {original.StudyInstanceUID}


def test_an_arrival_for_a_study_no_longer_held_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    """Without the original study, the identity cannot be put back: the instance is refused
    with a reason (never stored under the original study with a dummy patient)."""
    store = Store(database_url)
    with store.session() as s:
        s.add(
            Pseudonym(
                pseudonym_uid="2.25.1", original_uid="1.2.3", study_uid="1.2.3", destination="x"
            )
        )
    arrival = Dataset()
    arrival.StudyInstanceUID = "2.25.1"
    with pytest.raises(LookupError, match="no longer held"):
        Reidentifier(store)(arrival, lambda: arrival)
    ingest = Ingest(store, tmp_path / "spool", reidentify=Reidentifier(store))
    arrival.SeriesInstanceUID, arrival.SOPInstanceUID = "2.25.2", "2.25.3"
    arrival.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    outcome = ingest.store_instance(
        arrival, Received(transfer_syntax="1.2.840.10008.1.2.1", data=b"x")
    )
    assert outcome.status == StoreStatus.PROCESSING_FAILURE
    assert "no longer held" in outcome.reason
    with store.session() as s:
        assert s.scalar(select(Instance.sop_instance_uid)) is None
