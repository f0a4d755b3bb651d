"""One typed settings tree: defaults, YAML file, environment, flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from airouter.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("AIROUTER_"):
            monkeypatch.delenv(key)


def test_embedded_defaults_match_the_contract() -> None:
    s = load_settings()
    assert (s.ae_title, s.dimse_port, s.http_host, s.http_port) == (
        "AIROUTER",
        11112,
        "127.0.0.1",
        8080,
    )
    assert s.data_dir == Path("var") and s.triton_url == "local"
    assert s.destinations["pacs"].port == 4242
    assert {k: v.number for k, v in s.output_series.items()} == {
        "SEG": 901,
        "SR": 902,
        "RTSTRUCT": 903,
        "PROBABILITY_MAP": 904,
    }


def test_config_file_matches_embedded_defaults() -> None:
    """config/airouter.yaml documents the defaults; loading it changes nothing."""
    root = Path(__file__).resolve().parents[1]
    assert load_settings(root / "config" / "airouter.yaml") == load_settings()


def test_precedence_flags_over_environment_over_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("ae_title: FROMFILE\ndimse_port: 2000\nhttp_port: 3000\n")
    monkeypatch.setenv("AIROUTER_DIMSE_PORT", "2001")
    s = load_settings(config, http_port=3001)
    assert (s.ae_title, s.dimse_port, s.http_port) == ("FROMFILE", 2001, 3001)


def test_nested_environment_override_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIROUTER_DESTINATIONS__PACS__PORT", "104")
    pacs = load_settings().destinations["pacs"]
    assert (pacs.ae_title, pacs.host, pacs.port) == ("ORTHANC", "127.0.0.1", 104)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("ae_title: 'BACK\\\\SLASH'\n", "ae_title"),
        ("ae_title: WAYTOOLONGFORANAETITLE\n", "ae_title"),
        ("dimse_port: 70000\n", "dimse_port"),
        ("no_such_setting: 1\n", "no_such_setting"),
        ("destinations: {pacs: {ae_title: X, host: h, port: 1, tls: true}}\n", "tls"),
    ],
)
def test_invalid_configuration_names_the_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert key in str(info.value) and str(config) in str(info.value)


def test_destination_kinds_are_validated_by_kind() -> None:
    s = load_settings(
        destinations={
            "tps": {"ae_title": "TPS", "host": "tps", "port": 104, "tls": {"ca_file": "/ca.pem"}},
            "web": {"kind": "dicomweb", "url": "https://pacs/dicom-web", "token": "t"},
            "rest": {"kind": "orthanc", "url": "http://orthanc:8042"},
            "out": {"kind": "folder", "path": "/srv/out"},
        }
    )
    kinds = {name: type(node).__name__ for name, node in s.destinations.items()}
    assert kinds == {
        "pacs": "DicomNode",
        "tps": "DicomNode",
        "web": "DicomWebNode",
        "rest": "OrthancNode",
        "out": "FolderNode",
    }
    with pytest.raises(ConfigError, match=r"destinations\.web\.dicomweb\.url"):
        load_settings(destinations={"web": {"kind": "dicomweb", "url": "ftp://x"}})
    with pytest.raises(ConfigError, match=r"destinations\.x"):
        load_settings(destinations={"x": {"kind": "carrier-pigeon", "path": "/"}})
