"""Planning-grade results: what planning systems refuse, one identity per structure across SEG,
SR and RTSTRUCT, and site structure templates, checked on the objects the pipeline writes for
the shared CTs (head phantom, the same re-described as gantry-tilted, the JPEG 2000 body CT, an
enhanced multi-frame CT), with third-party readers (PixelMed's DicomSRValidator, dcmqi's
tid1500reader) reading the SR."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator

from airouter.core.settings import EncoderSettings
from airouter.core.templates import TemplateError, load_templates, parse_templates
from airouter.core.vocab import OutputKind
from airouter.jobs.specs import apply_template, out_of_view, structures_of
from encoders.common import IDENTIFIERS
from encoders.outputs import OutputRequest, SourceSeries, encode_outputs
from inference.algorithms import segment_body, segment_lungs
from inference.cards import ModelCardError, load_card, load_cards
from inference.runner import ModelOutput
from inference.volume import build_volume
from tests.objects import dataset_bytes
from tests.peers import BODY_J2K, ROOT, head_ct_files

warnings.filterwarnings("ignore", category=UserWarning)

CARDS = load_cards(ROOT / "config" / "models")
TEMPLATES = load_templates(ROOT / "config" / "templates")
KINDS = frozenset({OutputKind.SEG, OutputKind.SR, OutputKind.RTSTRUCT})
# Maximum value lengths in bytes (PS3.5 Table 6.2-1) of the VRs checked everywhere.
MAX_BYTES = {"SH": 16, "LO": 64, "CS": 16, "AE": 16, "DS": 16, "IS": 12, "UI": 64, "ST": 1024}


def _head_files(tmp: Path) -> list[Path]:
    return head_ct_files()[50:90]


def _tilted_files(tmp: Path) -> list[Path]:
    """The head CT re-described as acquired with a 12-degree gantry tilt (geometry only)."""
    t = np.radians(12.0)
    col_dir = [0.0, float(np.cos(t)), float(-np.sin(t))]
    out = []
    study, series, frame = hd.UID(), hd.UID(), hd.UID()
    for k, path in enumerate(head_ct_files()[50:90]):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hd.UID()
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, *col_dir]
        ds.ImagePositionPatient = [-125.0, -125.0 + k * np.tan(t), 40.0 + k * 1.0]
        target = tmp / f"tilted{k:03d}.dcm"
        ds.save_as(target)
        out.append(target)
    return out


def _j2k_files(tmp: Path) -> list[Path]:
    """The JPEG 2000 body CT with its blank data-set UIDs repaired (as the node's ingest
    does: the file meta's SOP Instance UID, one new study and series)."""
    study, series = hd.UID(), hd.UID()
    out = []
    for k, path in enumerate(sorted(p for p in BODY_J2K.iterdir() if p.is_file())):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        target = tmp / f"j2k{k:03d}.dcm"
        ds.save_as(target)
        out.append(target)
    return out


def _enhanced_files(tmp: Path) -> list[Path]:
    images = [pydicom.dcmread(f) for f in head_ct_files()[50:90]]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        images,
        series_instance_uid=hd.UID(),
        series_number=77,
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    path = tmp / "enhanced.dcm"
    enhanced.save_as(path)
    return [path]


SOURCES = {
    "head": _head_files,
    "tilted": _tilted_files,
    "j2k": _j2k_files,
    "multiframe": _enhanced_files,
}


def pipeline_objects(
    files: list[Path], template: str | None, settings: EncoderSettings | None = None
) -> tuple[dict[str, Dataset], dict[str, bytes], list[Dataset]]:
    """SEG, SR and RTSTRUCT as the pipeline writes them (the bundled classic models' code, the
    template applied, the encoders' one entry point, Part 10 bytes as the archive stores
    them); also the source images they reference."""
    volume = build_volume(files)
    outputs = {
        "ct-body": ModelOutput(labels=segment_body(volume.hu, volume.affine)),
        "ct-lungs": ModelOutput(labels=segment_lungs(volume.hu, volume.affine)),
    }
    structures = [
        s
        for name, out in outputs.items()
        for s in structures_of(CARDS[name], out, volume.hu, volume.voxel_volume_ml)
    ]
    chosen = TEMPLATES[template] if template else None
    templated = apply_template(chosen, structures)
    body_part = str(volume.datasets[0].get("BodyPartExamined", "") or "")
    encoded = encode_outputs(
        request=OutputRequest(
            kinds=KINDS,
            out_of_view=out_of_view(CARDS, templated.structures, body_part),
            research=bool(chosen and chosen.research),
            structure_set_label=chosen.structure_set.label if chosen else "AI",
            structure_set_name=chosen.structure_set.name if chosen else None,
            placeholders=bool(chosen and chosen.placeholders),
        ),
        source=SourceSeries(volume.datasets, volume.sources, volume.in_source_order),
        structures=templated.structures,
        settings=settings or EncoderSettings(),
        device_uid=hd.UID(),
    )
    objects, raw = {}, {}
    for kind, ds in encoded.objects:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        raw[kind.value] = buffer.getvalue()
        objects[kind.value] = pydicom.dcmread(io.BytesIO(raw[kind.value]))
    return objects, raw, list(volume.source_images)


@pytest.fixture(scope="module", params=sorted(SOURCES))
def written(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, Dataset], dict[str, bytes], list[Dataset]]]:
    tmp = tmp_path_factory.mktemp(request.param)
    files = SOURCES[request.param](tmp)
    objects, raw, sources = pipeline_objects(files, "tg263")
    assert set(objects) == {"SEG", "SR", "RTSTRUCT"}
    yield request.param, objects, raw, sources


def _walk(ds: Dataset) -> Iterator[pydicom.DataElement]:
    for element in ds:
        yield element
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk(item)


def test_rtstruct_has_nothing_a_planning_system_refuses(
    written: tuple[str, dict[str, Dataset], dict[str, bytes], list[Dataset]],
) -> None:
    name, objects, _, sources = written
    rt = objects["RTSTRUCT"]
    first = sources[0]
    # patient and study exactly as the CT has them; nothing invented
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "AccessionNumber",
        "StudyDate",
        "StudyTime",
    ):
        assert rt.get(keyword) == first.get(keyword, ""), keyword
    assert "InstitutionName" not in rt  # the settings name none: never invented
    assert rt.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert "AI" in rt.SeriesDescription
    assert rt.ApprovalStatus == "UNAPPROVED"
    assert rt.StructureSetLabel == "AI_TG263" and rt.StructureSetName == "AI contours (TG-263)"
    # the referenced series lists every CT instance (every frame of a multi-frame image)
    series = (
        rt.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
    )
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    listed = [
        (i.ReferencedSOPInstanceUID, int(i.get("ReferencedFrameNumber", 0) or 0))
        for i in series.ContourImageSequence
    ]
    if name == "multiframe":
        frames = int(first.NumberOfFrames)
        assert sorted(n for _, n in listed) == list(range(1, frames + 1))
    else:
        assert sorted(uid for uid, _ in listed) == sorted(s.SOPInstanceUID for s in sources)
    listed_uids = {uid for uid, _ in listed}
    for roi in rt.StructureSetROISequence:
        assert roi.ROIGenerationAlgorithm == "AUTOMATIC"
        assert "ct-" in roi.ROIGenerationDescription and "card:" in roi.ROIGenerationDescription
        assert len(roi.ROIName) <= 16
    for obs in rt.RTROIObservationsSequence:
        assert obs.RTROIInterpretedType in ("EXTERNAL", "ORGAN")
    count = 0
    for roi in rt.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            count += 1
            values = contour.ContourData
            assert int(contour.NumberOfContourPoints) * 3 == len(values)
            assert int(contour.NumberOfContourPoints) >= 3
            (image,) = contour.ContourImageSequence
            assert image.ReferencedSOPInstanceUID in listed_uids
    assert count > 0
    # every DS of ContourData at most 16 bytes, as written (pydicom keeps the text it read)
    for contour in (c for r in rt.ROIContourSequence for c in r.get("ContourSequence", [])):
        for value in contour.ContourData:
            assert len(getattr(value, "original_string", str(value))) <= 16


def test_every_object_ends_where_its_data_set_ends_and_respects_value_lengths(
    written: tuple[str, dict[str, Dataset], dict[str, bytes], list[Dataset]],
) -> None:
    """Parsed to the end: the top-level elements read from the bytes are exactly the data
    set's, in order, and the last one ends at the file's last byte (a planning system refused
    files with trailing bytes). Every SH/LO/CS/AE/DS/IS/UI/ST value fits its VR."""
    _, objects, raw, _ = written
    for kind, data in raw.items():
        body = dataset_bytes(data)
        fp = io.BytesIO(body)
        tags = [e.tag for e in data_element_generator(fp, False, True)]
        assert fp.tell() == len(body), kind
        assert tags == sorted(objects[kind].keys()), kind
        for element in _walk(objects[kind]):
            limit = MAX_BYTES.get(element.VR)
            if limit is None or element.value in (None, "") or element.keyword in IDENTIFIERS:
                continue
            if element.tag == 0x30060050:
                continue  # ContourData: checked value by value as written
            value = element.value
            multiple = isinstance(value, list | tuple | pydicom.multival.MultiValue)
            for v in list(value) if multiple else [value]:
                v = getattr(v, "original_string", v)
                assert len(str(v).encode("utf-8")) <= limit, (kind, element.keyword, v)


def test_one_identity_per_structure_across_seg_sr_and_rtstruct(
    written: tuple[str, dict[str, Dataset], dict[str, bytes], list[Dataset]],
) -> None:
    _, objects, _, _ = written
    seg, sr, rt = objects["SEG"], objects["SR"], objects["RTSTRUCT"]
    segments = {
        str(s.SegmentLabel): (str(s.TrackingID), str(s.TrackingUID)) for s in seg.SegmentSequence
    }
    assert "External" in segments  # the template's names
    report = hd.sr.srread(io.BytesIO(_bytes(sr)))
    groups = {}
    for group in report.content.get_volumetric_roi_measurement_groups():
        groups[group.tracking_identifier] = group.tracking_uid
    for label, (tracking_id, uid) in segments.items():
        assert tracking_id == label
        assert groups[tracking_id] == uid
    names = {r.ROINumber: r.ROIName for r in rt.StructureSetROISequence}
    for obs in rt.RTROIObservationsSequence:
        name = names[obs.ReferencedROINumber]
        if name in segments:
            assert f"Tracking UID {segments[name][1]}" in obs.ROIObservationDescription
            assert obs.ROIObservationLabel == name
    # SEG: a recommended display colour per segment (the template's, as CIELab), a content
    # creator (type 2: present, empty: a device made it)
    colors = {e.name: e.color for e in TEMPLATES["tg263"].structures}
    for item in seg.SegmentSequence:
        expected = hd.color.CIELabColor.from_rgb(*colors[str(item.SegmentLabel)]).value
        assert tuple(item.RecommendedDisplayCIELabValue) == tuple(expected)
    assert "ContentCreatorName" in seg
    # the SR's Image Library lists the source images
    library = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"
    ]
    assert len(library) == 1 and len(library[0].ContentSequence) >= 1


def test_a_structure_out_of_the_models_view_is_not_assessable_rather_than_absent(
    written: tuple[str, dict[str, Dataset], dict[str, bytes], list[Dataset]],
) -> None:
    """The head CT (Body Part Examined BRAIN) has no lungs in view: ct-lungs, which tells
    absence only on a chest, reports each lung "Presence Undetermined" with the reason, never
    the definite negative "Absent"; the body, found, is measured as usual. Where the series
    names no region, the model's "Absent" stands."""
    name, objects, _, sources = written
    part = str(sources[0].get("BodyPartExamined", "") or "")
    report = hd.sr.srread(io.BytesIO(_bytes(objects["SR"])))
    groups = report.content.get_planar_roi_measurement_groups() + list(
        report.content.get_volumetric_roi_measurement_groups()
    )
    assert {g.tracking_identifier for g in groups} == {"External"}
    evaluations = {}
    for group in report.content[0].ContentSequence:
        if group.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for item in group.ContentSequence:
            texts = {
                c.ConceptNameCodeSequence[0].CodeMeaning: c
                for c in item.ContentSequence
                if "ConceptNameCodeSequence" in c
            }
            tracking = str(texts["Tracking Identifier"].TextValue)
            for c in item.ContentSequence:
                if c.ValueType == "CODE" and tracking.startswith("Lung"):
                    meaning = c.ConceptCodeSequence[0].CodeMeaning
                    if meaning in ("Absent", "Presence Undetermined"):
                        comment = texts.get("Comment")
                        evaluations[tracking] = (meaning, comment and str(comment.TextValue))
    assert set(evaluations) == {"Lung_R", "Lung_L"}, (name, evaluations)
    for meaning, comment in evaluations.values():
        if part.upper() == "BRAIN":  # the head CT, tilted or multi-frame
            assert meaning == "Presence Undetermined", (name, meaning)
            assert comment == (
                "Not assessable: out of view: Body Part Examined BRAIN is not a region in "
                "which ct-lungs can tell absence"
            ), comment
        elif part:  # the J2K body CT says PARTIALBODY: not known to hold both lungs either
            assert part == "PARTIALBODY" and meaning == "Presence Undetermined", (name, part)
        else:  # the legacy-converted multi-frame image lost the region: the model's answer
            assert name == "multiframe" and (meaning, comment) == ("Absent", None), name


def test_a_model_tells_absence_on_its_own_region_or_an_unknown_one() -> None:
    lungs = CARDS["ct-lungs"]
    assert lungs.covers("CHEST") and lungs.covers("chest ") and lungs.covers("")
    assert not lungs.covers("BRAIN") and not lungs.covers("HEAD")
    assert CARDS["ct-body"].covers("BRAIN")  # no body_parts: every region
    text = (ROOT / "config" / "models" / "ct-lungs.yaml").read_text()
    bad = text.replace("body_parts: [CHEST,", "body_parts: [chest,")
    path = ROOT / "var" / "test-cards" / "ct-lungs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_text(bad)
        with pytest.raises(ModelCardError, match="body_parts: 'chest' is not a BodyPartExamined"):
            load_card(path)
    finally:
        path.unlink()


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


GROUP_TEMPLATES = {"1410", "1411", "1501"}  # what a TID 1500 measurement group may be
_WITHIN = re.compile(r"^Error: Template (\d+) .*?: within ([\d.]+): ")


def sr_errors_not_excused(text: str) -> list[str]:
    """DicomSRValidator's errors, less those the standard excuses: it tries every template a
    measurement group may follow (TID 1410, 1411, 1501) and reports, for each, what that one
    misses. A group that fails some of them and not all conforms to the others."""
    failed: dict[str, set[str]] = {}
    errors = []
    for line in text.splitlines():
        if not line.startswith("Error"):
            continue
        match = _WITHIN.match(line)
        if match and match.group(1) in GROUP_TEMPLATES:
            failed.setdefault(match.group(2), set()).add(match.group(1))
        else:
            errors.append(line)
    errors += [
        f"group {g} conforms to no template: {t}" for g, t in failed.items() if t >= GROUP_TEMPLATES
    ]
    return errors


JAVA_XML_LIMITS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]


def test_third_party_readers_accept_the_sr(
    written: tuple[str, dict[str, Dataset], dict[str, bytes], list[Dataset]],
    tmp_path: Path,
) -> None:
    """PixelMed's DicomSRValidator (the SR against the TID 1500 templates) reports no error,
    and dcmqi's tid1500reader turns it into its JSON with every measurement group."""
    name, objects, raw, _ = written
    path = tmp_path / "sr.dcm"
    path.write_bytes(raw["SR"])
    if name != "tilted":  # PixelMed takes ~30 s a report; the tilted one is the head's again
        _pixelmed_validates(name, path)
    out = tmp_path / "sr.json"
    reader = subprocess.run(
        [
            str(Path(sys.executable).parent / "tid1500reader"),
            "--inputDICOM",
            str(path),
            "--outputMetadata",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert reader.returncode == 0, reader.stdout + reader.stderr
    metadata = json.loads(out.read_text())
    groups = metadata["Measurements"]
    found = [str(s.SegmentLabel) for s in objects["SEG"].SegmentSequence]
    assert {g["TrackingIdentifier"] for g in groups} >= set(found)


def _pixelmed_validates(name: str, path: Path) -> None:
    java = subprocess.run(
        [
            "java",
            "-Xmx6g",
            *JAVA_XML_LIMITS,
            "-cp",
            "/usr/share/java/pixelmed.jar",
            "com.pixelmed.validate.DicomSRValidator",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    text = java.stdout + java.stderr
    print(f"\nDicomSRValidator on {name}:\n{text[-3000:]}")
    assert "Root Template Validation Complete" in text and "IOD validation complete" in text
    assert sr_errors_not_excused(text) == [], text


# --- templates -----------------------------------------------------------------------------


def test_the_shipped_templates_name_only_what_the_bundled_models_give() -> None:
    for template in TEMPLATES.values():
        for entry in template.structures:
            card = CARDS[entry.model]
            assert entry.label in {label.name for label in card.labels}, entry


def test_a_template_with_an_over_long_or_duplicate_name_is_refused_with_file_and_line() -> None:
    text = """templates:
  - name: site
    structures:
      - {model: ct-body, label: Body, name: External}
      - {model: ct-lungs, label: Right Lung, name: Lung_R_Upper_Lobe_X}
"""
    with pytest.raises(TemplateError) as long_name:
        parse_templates(text, "site.yaml")
    assert "site.yaml:5:" in str(long_name.value) and "16 characters" in str(long_name.value)
    text = """templates:
  - name: site
    structures:
      - {model: ct-lungs, label: Right Lung, name: Lung_R}
      - {model: ct-lungs, label: Left Lung, name: LUNG_r}
"""
    with pytest.raises(TemplateError) as dupe:
        parse_templates(text, "site.yaml")
    assert "site.yaml:5:" in str(dupe.value) and "unique regardless of case" in str(dupe.value)
    text = """templates:
  - name: site
    structure_set: {label: A_LABEL_LONGER_THAN_16}
    structures:
      - {model: ct-body, label: Body, name: External}
"""
    with pytest.raises(TemplateError) as label:
        parse_templates(text, "site.yaml")
    assert "site.yaml:3:" in str(label.value)


def test_a_research_template_marks_results_and_lists_placeholders(tmp_path: Path) -> None:
    """On the head CT the lungs are not found: the research template's RTSTRUCT still lists
    them, without contours, and every object says NOT FOR CLINICAL USE."""
    objects, _, _ = pipeline_objects(head_ct_files()[40:80], "tg263-research")
    rt = objects["RTSTRUCT"]
    names = {r.ROINumber: str(r.ROIName) for r in rt.StructureSetROISequence}
    assert sorted(names.values()) == ["External", "Lung_L", "Lung_R"]
    contours = {
        names[c.ReferencedROINumber]: len(c.get("ContourSequence", []))
        for c in rt.ROIContourSequence
    }
    assert contours["External"] > 0 and contours["Lung_R"] == contours["Lung_L"] == 0
    for ds in objects.values():
        assert str(ds.SeriesDescription).startswith("NOT FOR CLINICAL USE")
    assert str(rt.StructureSetName).startswith("NOT FOR CLINICAL USE")
    assert "NOT FOR CLINICAL USE" in rt.StructureSetDescription


def test_without_a_template_the_cards_names_stay(tmp_path: Path) -> None:
    objects, _, _ = pipeline_objects(head_ct_files()[40:60], None)
    names = [str(r.ROIName) for r in objects["RTSTRUCT"].StructureSetROISequence]
    assert names == ["Body"]


def test_a_contour_that_a_planning_system_would_refuse_is_dropped_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A boundary of fewer than 3 distinct points or without area is never written; the job
    hears how many were dropped, per structure."""
    import encoders.rtstruct as rtstruct
    from encoders.common import Box
    from encoders.contours import Contours

    line = [[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]]
    two_points = [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    triangle = [[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    assert rtstruct._degenerate(np.array(line))
    assert rtstruct._degenerate(np.array(two_points))
    assert not rtstruct._degenerate(np.array(triangle))
    together = Contours(
        np.zeros(4, dtype=np.int64),
        np.array([0, 3, 6, 9, 11]),
        np.array([*line, *two_points, *triangle, [0.0, 0.0], [1.0, 1.0]]),
    )
    assert rtstruct._degenerate_contours(together).tolist() == [True, True, False, True]
    real = rtstruct.trace
    sliver = np.array([[5.0, 5.0], [5.0, 6.0], [5.0, 7.0]])

    def with_a_sliver(mask: np.ndarray, box: Box | None = None) -> Contours:
        found = real(mask, box)
        ks = np.unique(found.slices)
        return Contours(
            np.concatenate([found.slices, ks]),
            np.concatenate([found.starts, found.starts[-1] + 3 * np.arange(1, len(ks) + 1)]),
            np.concatenate([found.points, *([sliver] * len(ks))]),
        )

    monkeypatch.setattr(rtstruct, "trace", with_a_sliver)
    volume = build_volume(head_ct_files()[40:50])
    labels = segment_body(volume.hu, volume.affine)
    (body,) = structures_of(
        CARDS["ct-body"], ModelOutput(labels=labels), volume.hu, volume.voxel_volume_ml
    )
    encoded = encode_outputs(
        request=OutputRequest(kinds=frozenset({OutputKind.RTSTRUCT})),
        source=SourceSeries(copy.deepcopy(volume.datasets)),
        structures=[body],
        settings=EncoderSettings(),
        device_uid=hd.UID(),
    )
    (rt,) = [ds for kind, ds in encoded.objects if kind is OutputKind.RTSTRUCT]
    for contour in rt.ROIContourSequence[0].ContourSequence:
        assert int(contour.NumberOfContourPoints) >= 3
    slices = int(body.mask.any(axis=(1, 2)).sum())  # one sliver added on each slice with body
    notes = dict(encoded.notes)
    assert notes["contours_dropped"] == f"Body: {slices} contours of fewer than 3 points or no area"


def test_the_node_checks_templates_against_its_model_cards(tmp_path: Path) -> None:
    """A label a served model does not have is refused; a model this node does not serve is
    only logged (a site template may name models installed elsewhere); a destination that
    names an unknown template is refused."""
    from airouter.app.shared import site_templates
    from airouter.core.settings import Settings

    (tmp_path / "site.yaml").write_text(
        "templates:\n  - name: site\n    structures:\n"
        "      - {model: ct-body, label: Body, name: External}\n"
        "      - {model: not-installed, label: Liver, name: Liver}\n"
    )
    settings = Settings(encoders={"templates_dir": str(tmp_path)})
    assert set(site_templates(CARDS, settings)) == {"site"}
    (tmp_path / "typo.yaml").write_text(
        "templates:\n  - name: typo\n    structures:\n"
        "      - {model: ct-lungs, label: Right lung, name: Lung_R}\n"
    )
    with pytest.raises(TemplateError, match="model ct-lungs has no label 'Right lung'"):
        site_templates(CARDS, settings)
    (tmp_path / "typo.yaml").unlink()
    pacs = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "template": "nowhere"}
    settings = Settings(
        encoders={"templates_dir": str(tmp_path)}, dispatch={"destinations": {"pacs": pacs}}
    )
    with pytest.raises(TemplateError, match=r"dispatch\.destinations\.pacs\.template"):
        site_templates(CARDS, settings)


def test_structures_measure_their_masks_without_copying_a_binary_answer() -> None:
    """A model answer of 0 and 1 (ct-body) is its structure's mask without a copy; labels of
    more values give one mask each. Volume and attenuation are those of the mask."""
    volume = build_volume(head_ct_files()[40:50])
    labels = segment_body(volume.hu, volume.affine)
    (body,) = structures_of(
        CARDS["ct-body"], ModelOutput(labels=labels), volume.hu, volume.voxel_volume_ml
    )
    assert np.shares_memory(body.mask, labels) and body.mask.dtype == bool
    values = volume.hu[labels == 1]
    assert body.intensities_hu == pytest.approx((values.mean(), values.min(), values.max()))
    assert body.volume_ml == pytest.approx(values.size * volume.voxel_volume_ml)
    two = labels.copy()
    two[:, :, : two.shape[2] // 2] *= 2  # the left half labelled 2
    right, left = structures_of(
        CARDS["ct-lungs"], ModelOutput(labels=two), volume.hu, volume.voxel_volume_ml
    )
    assert not np.shares_memory(right.mask, two)
    assert np.array_equal(right.mask, two == 1) and np.array_equal(left.mask, two == 2)
    assert left.intensities_hu is not None and right.intensities_hu is not None
    # the same labels as each label's bits (labels_as_bits): the same masks and measures
    bits = np.stack([np.packbits(two == v, axis=-1) for v in (1, 2)])
    packed = structures_of(
        CARDS["ct-lungs"], ModelOutput(label_bits=bits), volume.hu, volume.voxel_volume_ml
    )
    for unpacked, from_labels in zip(packed, (right, left), strict=True):
        assert np.array_equal(unpacked.mask, from_labels.mask)
        assert unpacked.volume_ml == from_labels.volume_ml
        assert unpacked.intensities_hu == from_labels.intensities_hu


def test_a_structure_costs_memory_only_for_the_slabs_it_spans() -> None:
    """A mask is written only where its label is: a label found on a few slices of a large
    volume, or not at all, leaves the rest of its mask untouched memory (the process grows by
    those slabs, not by the volume), and the mask is still exactly ``labels == value``."""
    from airouter.jobs.specs import mask_of, unpacked_mask

    def resident_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    labels = np.zeros((400, 512, 512), dtype=np.uint8)  # 100 MB
    labels[200:216] = 1  # one slab
    labels[100:116, 10:20, 10:20] = 2
    before = resident_mb()
    masks = [mask_of(labels, value) for value in (1, 2, 3)]
    grown = resident_mb() - before
    for value, mask in zip((1, 2, 3), masks, strict=True):
        assert mask.dtype == bool and np.array_equal(mask, labels == value)
    assert not masks[2].any()  # label 3 nowhere
    bits = [np.packbits(labels == value, axis=-1) for value in (1, 2, 3)]
    before_bits = resident_mb()
    unpacked = [unpacked_mask(b, labels.shape) for b in bits]  # the same from bits
    grown += resident_mb() - before_bits
    for value, mask in zip((1, 2, 3), unpacked, strict=True):
        assert mask.dtype == bool and np.array_equal(mask, labels == value)
    with pytest.raises(ValueError, match="bits of"):
        unpacked_mask(bits[0][:, :, :-1], labels.shape)
    assert grown < 40, f"{grown:.0f} MB for masks of 2 slabs, twice (a full one is 100 MB)"
    full = labels == 3  # what writing every voxel costs, for comparison
    assert resident_mb() - before > 90
    del full
