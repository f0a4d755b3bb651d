"""Rules: typed loading with clear errors, condition semantics, series selection."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from airouter.core.tags import series_tags
from airouter.core.vocab import Priority
from router.engine import (
    SeriesInfo,
    StudyContext,
    condition_holds,
    decide,
    explain,
    orientation_of,
)
from router.rules import Condition, Orientation, RuleError, load_rule_file, load_rules
from tests.peers import HEAD_CT, HEAD_SCOUT, MR_EPI, ROOT

RULES_DIR = ROOT / "rules"


def test_every_shipped_rule_file_loads() -> None:
    files = sorted(RULES_DIR.glob("*.yaml"))
    assert files
    for path in files:
        assert load_rule_file(path), path
    names = [r.name for r in load_rules(RULES_DIR)]
    assert "ct-body-lungs" in names


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


BASE = "rules:\n  - name: r1\n    models: [ct-body]\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    colour: red\n", "colour"),  # unknown key
        ("    match: {Modality: {regex: '('}}\n", "invalid regular expression"),
        ("    match: {NotAKeyword: CT}\n", "unknown DICOM keyword: NotAKeyword"),
        ("    match: {Modality: {equals: CT, regex: C}}\n", "exactly one of"),
        ("    priority: whenever\n", "priority"),
        ("    outputs: [PDF]\n", "outputs"),
    ],
)
def test_invalid_rules_are_rejected_naming_file_and_key(
    tmp_path: Path, extra: str, message: str
) -> None:
    path = _write(tmp_path, BASE + extra)
    with pytest.raises(RuleError) as info:
        load_rule_file(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_rule_without_models_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="models"):
        load_rule_file(_write(tmp_path, "rules:\n  - name: r1\n    models: []\n"))


def test_duplicate_rule_names_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(BASE)
    (tmp_path / "b.yaml").write_text(BASE)
    with pytest.raises(RuleError, match="duplicate rule names: r1"):
        load_rules(tmp_path)


@pytest.mark.parametrize(
    ("condition", "value", "holds"),
    [
        ({"equals": "CT"}, "CT", True),
        ({"equals": "CT"}, "MR", False),
        ({"equals": "CT"}, None, False),  # missing tag
        ({"equals": "CT"}, "", False),  # empty tag
        ({"equals": 1.0}, "1.0", True),  # numeric compare of a DS string
        ({"equals": 1.0}, "abc", False),  # wrong type
        ({"one_of": ["CT", "PT"]}, "PT", True),
        ({"one_of": ["CT", "PT"]}, "MR", False),
        ({"regex": "(?i)chest|thorax"}, "CT THORAX 1mm", True),
        ({"regex": "^BRAIN"}, "STD BRAIN 1MM", False),
        ({"equals": "LOCALIZER"}, ["ORIGINAL", "PRIMARY", "LOCALIZER"], True),  # multi-valued
        ({"regex": "AXIAL"}, ["ORIGINAL", "PRIMARY", "AXIAL"], True),
        ({"contains": "LOCALIZER"}, ["ORIGINAL", "PRIMARY", "LOCALIZER"], True),
        ({"contains": "LOCAL"}, ["ORIGINAL", "PRIMARY", "LOCALIZER"], False),  # whole values
        ({"contains": "AXIAL"}, None, False),
        ({"range": {"min": 0.5, "max": 1.5}}, "1.0", True),
        ({"range": {"min": 0.5, "max": 1.5}}, "3", False),
        ({"range": {"max": 1.0}}, [0.45, 0.45], True),  # every value of PixelSpacing
        ({"range": {"max": 1.0}}, [0.45, 1.2], False),
        ({"range": {"min": 1}}, "thick", False),  # wrong type
        ({"range": {"min": 1}}, None, False),  # missing
        ({"present": True}, "CHEST", True),
        ({"present": True}, "", False),
        ({"present": False}, None, True),
        ({"present": False}, "CHEST", False),
    ],
)
def test_condition_table(condition: dict, value: object, holds: bool) -> None:
    assert condition_holds(Condition(**condition), value) is holds


@pytest.mark.parametrize(
    ("age", "holds"),
    [
        ("045Y", True),
        ("017Y", False),
        ("018Y", True),
        ("006M", False),
        ("250W", False),
        ("7000D", False),
        ("garbage", False),
        (None, False),
    ],
)
def test_patient_age_range_is_in_years(age: str | None, holds: bool) -> None:
    assert condition_holds(Condition(range={"min": 18}), age, "PatientAge") is holds


@pytest.mark.parametrize(
    ("iop", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], Orientation.AXIAL),
        ([1, 0, 0, 0, 0, -1], Orientation.CORONAL),
        ([0, 1, 0, 0, 0, -1], Orientation.SAGITTAL),
        ([1, 0, 0, 0, 0.966, -0.259], Orientation.AXIAL),  # 15 degree gantry tilt
        ([1, 0, 0, 0, 0.707, -0.707], Orientation.OBLIQUE),
        (None, None),
        ([1, 0, 0], None),
    ],
)
def test_orientation_from_image_orientation(
    iop: list[float] | None, expected: Orientation | None
) -> None:
    assert orientation_of(iop) == expected


def _series(folder: Path, pattern: str = "*") -> SeriesInfo:
    files = [p for p in sorted(folder.glob(pattern)) if p.name != "DIRFILE"]
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return SeriesInfo(str(ds.SeriesInstanceUID), series_tags(ds), len(files))


def test_real_study_selects_the_axial_ct_not_the_scout_or_the_mr() -> None:
    ct, scout, mr = _series(HEAD_CT), _series(HEAD_SCOUT), _series(MR_EPI, "*.dcm")
    assert "LOCALIZER" in scout.tags["ImageType"]
    rules = load_rules(RULES_DIR)
    decisions = decide(StudyContext([scout, mr, ct]), rules)
    assert [(d.rule.name, d.series_uid) for d in decisions] == [("ct-body-lungs", ct.series_uid)]
    assert decisions[0].rule.priority is Priority.ROUTINE
    assert decide(StudyContext([mr]), rules) == []
    assert decide(StudyContext([scout]), rules) == []  # a scout alone is never processed


def test_disabled_rule_never_matches(tmp_path: Path) -> None:
    rules = load_rule_file(_write(tmp_path, BASE + "    enabled: false\n"))
    assert decide(StudyContext([_series(HEAD_CT)]), rules) == []


def test_required_series(tmp_path: Path) -> None:
    rules = load_rule_file(
        _write(
            tmp_path,
            BASE
            + (
                "    require_series:\n"
                "      - {match: {Modality: CT, ImageType: {regex: AXIAL}}, min_instances: 100}\n"
                "      - {match: {Modality: CT, ImageType: LOCALIZER}}\n"
            ),
        )
    )
    from router.engine import required_series_present

    ct, scout = _series(HEAD_CT), _series(HEAD_SCOUT)
    assert required_series_present(rules[0], [ct, scout])
    assert not required_series_present(rules[0], [ct])  # the scout is missing
    few = SeriesInfo(ct.series_uid, ct.tags, 50)
    assert not required_series_present(rules[0], [few, scout])  # too few slices yet
    assert not required_series_present(load_rules(RULES_DIR)[0], [ct, scout])  # states none


def _rules(tmp_path: Path, text: str) -> list:
    return load_rule_file(_write(tmp_path, text))


CT = SeriesInfo(
    "1.1",
    {
        "Modality": "CT",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "SliceThickness": "1.0",
        "PatientAge": "067Y",
        "BodyPartExamined": "CHEST",
    },
    200,
)
THICK = SeriesInfo("1.2", {**CT.tags, "SliceThickness": "5.0"}, 60)
SCOUT = SeriesInfo("1.3", {**CT.tags, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, 2)
MR = SeriesInfo("1.4", {"Modality": "MR", "ImageOrientationPatient": [1, 0, 0, 0, 1, 0]}, 30)


@pytest.mark.parametrize(
    ("when", "context", "matches"),
    [
        ("{any_series: {Modality: MR}}", StudyContext([CT, MR]), True),
        ("{any_series: {Modality: PT}}", StudyContext([CT, MR]), False),
        ("{all_series: {Modality: CT}}", StudyContext([CT, THICK]), True),
        ("{all_series: {Modality: CT}}", StudyContext([CT, MR]), False),
        (
            "{all: [{calling_ae: CT01}, {BodyPartExamined: CHEST}]}",
            StudyContext([CT], "CT01"),
            True,
        ),
        (
            "{all: [{calling_ae: CT01}, {BodyPartExamined: HEAD}]}",
            StudyContext([CT], "CT01"),
            False,
        ),
        (
            "{any: [{calling_ae: CT02}, {called_ae: AI_STAT}]}",
            StudyContext([CT], "CT01", "AI_STAT"),
            True,
        ),
        ("{not: {calling_ae: {regex: '^TEST'}}}", StudyContext([CT], "TESTCT"), False),
        (
            "{source_address: {regex: '^10\\.'}}",
            StudyContext([CT], source_address="10.1.2.3"),
            True,
        ),
        ("{PatientAge: {range: {min: 18}}}", StudyContext([CT]), True),
        ("{PatientAge: {range: {max: 16}}}", StudyContext([CT]), False),
        ("{PatientSex: {present: true}}", StudyContext([CT]), False),  # missing tag
    ],
)
def test_study_conditions_and_quantifiers(
    tmp_path: Path, when: str, context: StudyContext, matches: bool
) -> None:
    rules = _rules(
        tmp_path, BASE + f"    select: {{orientation: null, min_instances: 1}}\n    when: {when}\n"
    )
    verdict = explain(context, rules)[0]
    assert verdict.matched is matches, verdict.reason
    if not matches:
        assert verdict.reason  # the first failing condition, for --explain


def test_selection_filters_and_preferences(tmp_path: Path) -> None:
    thinnest = _rules(tmp_path, BASE + "    select: {prefer: [thinnest]}\n")
    assert decide(StudyContext([THICK, CT, SCOUT]), thinnest)[0].series_uid == CT.series_uid
    thick_only = _rules(tmp_path, BASE + "    select: {slice_thickness_mm: {min: 3}}\n")
    assert decide(StudyContext([THICK, CT]), thick_only)[0].series_uid == THICK.series_uid
    contrast = _rules(tmp_path, BASE + "    select: {contrast: true}\n")
    verdict = explain(StudyContext([CT]), contrast)[0]
    assert not verdict.matched and "no contrast agent" in verdict.reason


def test_order_stop_and_fallback(tmp_path: Path) -> None:
    rules = _rules(
        tmp_path,
        """rules:
  - name: catch-all
    fallback: true
    action: forward
    destinations: [pacs]
    select: {orientation: null}
  - {name: second, order: 20, models: [ct-body], match: {Modality: CT}}
  - {name: first, order: 10, stop: true, models: [ct-lungs], match: {Modality: CT}}
""",
    )
    names = [d.rule.name for d in decide(StudyContext([CT]), rules)]
    assert names == ["first"]  # stops before "second"; the fallback is not needed
    verdicts = {v.rule.name: v.reason for v in explain(StudyContext([CT]), rules)}
    assert verdicts["second"].startswith("not evaluated")
    assert verdicts["catch-all"].startswith("fallback")
    names = [d.rule.name for d in decide(StudyContext([MR]), rules)]
    assert names == ["catch-all"]  # nothing else matched an MR


def test_discard_and_forward_actions_need_what_they_need(tmp_path: Path) -> None:
    discard = _rules(tmp_path, "rules:\n  - {name: d, action: discard, when: {calling_ae: TEST}}\n")
    (decision,) = decide(StudyContext([CT], "TEST"), discard)
    assert decision.series_uid is None
    with pytest.raises(RuleError, match="forwarding rule needs at least one"):
        _rules(tmp_path, "rules:\n  - {name: f, action: forward}\n")


def test_errors_carry_file_line_and_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        BASE + "    when:\n      any:\n        - {calling_ae: CT01}\n        - {NotAKeyword: 1}\n",
    )
    with pytest.raises(RuleError) as info:
        load_rule_file(path)
    assert f"{path}:7: rules.0.when.any.1" in str(info.value)
    assert "unknown DICOM keyword: NotAKeyword" in str(info.value)


@pytest.mark.parametrize(
    ("tags", "adult"),
    [
        ({"PatientAge": "067Y"}, True),
        ({"PatientBirthDate": "19500101", "StudyDate": "20150206"}, True),  # no PatientAge
        ({"PatientBirthDate": "20100101", "StudyDate": "20150206"}, False),
        ({"PatientBirthDate": "garbage", "StudyDate": "20150206"}, False),
        ({}, False),
    ],
)
def test_patient_age_from_age_or_birth_date(tmp_path: Path, tags: dict, adult: bool) -> None:
    rules = _rules(
        tmp_path,
        BASE + "    select: {orientation: null}\n    when: {PatientAge: {range: {min: 18}}}\n",
    )
    series = SeriesInfo("1.9", {"Modality": "CT", **tags}, 10)
    assert explain(StudyContext([series]), rules)[0].matched is adult
