"""The spool: UID-validated paths and durable, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from airouter.core.spool import InvalidUID, check_uid, instance_path, is_valid_uid, write_durable


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("1.2.3", True),
        ("0.1", True),
        ("1." + "1" * 62, True),  # 64 characters
        ("1." + "1" * 63, False),  # 65 characters
        ("", False),
        ("1.02.3", False),  # leading zero in a component
        ("1..2", False),
        ("1.2.", False),
        ("../../etc/passwd", False),
        ("1.2/3", False),
        ("1.2.3\x00", False),
        ("abc", False),
    ],
)
def test_uid_grammar(value: str, valid: bool) -> None:
    assert is_valid_uid(value) is valid


def test_check_uid_names_the_attribute() -> None:
    with pytest.raises(InvalidUID, match="StudyInstanceUID is missing or empty"):
        check_uid("", "StudyInstanceUID")
    with pytest.raises(InvalidUID, match="SeriesInstanceUID is not a valid UID"):
        check_uid("../x", "SeriesInstanceUID")
    assert check_uid("1.2.3\x00", "SOPInstanceUID") == "1.2.3"  # UI padding is not content


def test_instance_path_never_uses_raw_strings(tmp_path: Path) -> None:
    assert instance_path(tmp_path, "1.2", "1.2.3", "1.2.3.4") == tmp_path / "1.2/1.2.3/1.2.3.4.dcm"
    with pytest.raises(InvalidUID):
        instance_path(tmp_path, "1.2", "../../..", "1.2.3.4")


def test_write_durable_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "x.dcm"
    write_durable(target, b"first")
    write_durable(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["x.dcm"]  # no temporary left over


def test_write_durable_failure_leaves_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        write_durable(blocker / "x.dcm", b"data")  # parent is a file
    assert blocker.read_bytes() == b""
