"""Rules: typed loading with clear errors, condition semantics, series selection."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from router.engine import SeriesInfo, condition_holds, decide, orientation_of
from router.rules import Condition, Orientation, Priority, RuleError, load_rule_file, load_rules
from scp.ingest import series_tags
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
    ],
)
def test_condition_table(condition: dict, value: object, holds: bool) -> None:
    assert condition_holds(Condition(**condition), value) is holds


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
    decisions = decide([scout, mr, ct], rules)
    assert [(d.rule.name, d.series_uid) for d in decisions] == [("ct-body-lungs", ct.series_uid)]
    assert decisions[0].rule.priority is Priority.ROUTINE
    assert decide([mr], rules) == []
    assert decide([scout], rules) == []  # a scout alone is never processed


def test_disabled_rule_never_matches(tmp_path: Path) -> None:
    rules = load_rule_file(_write(tmp_path, BASE + "    enabled: false\n"))
    assert decide([_series(HEAD_CT)], rules) == []


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
