"""One typed settings tree: defaults, YAML file, environment, flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airouter.core.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("AIROUTER_"):
            monkeypatch.delenv(key)


def test_embedded_defaults_match_the_contract() -> None:
    s = load_settings()
    assert (s.scp.ae_title, s.scp.dimse_port, s.http.host, s.http.port) == (
        "AIROUTER",
        11112,
        "127.0.0.1",
        8080,
    )
    assert s.data_dir == Path("var") and s.inference.triton_url == "local"
    assert s.dispatch.destinations["pacs"].port == 4242
    assert s.dispatch.calling_ae_title == "AIROUTER"  # the node's own, unless configured
    assert s.jobs.max_attempts == 3
    assert {k: v.number for k, v in s.encoders.output_series.items()} == {
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
    config.write_text("scp: {ae_title: FROMFILE, dimse_port: 2000}\nhttp: {port: 3000}\n")
    monkeypatch.setenv("AIROUTER_SCP__DIMSE_PORT", "2001")
    s = load_settings(config, http={"port": 3001})
    assert (s.scp.ae_title, s.scp.dimse_port, s.http.port) == ("FROMFILE", 2001, 3001)
    assert s.dispatch.calling_ae_title == "FROMFILE"


def test_nested_environment_override_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIROUTER_DISPATCH__DESTINATIONS__PACS__PORT", "104")
    pacs = load_settings().dispatch.destinations["pacs"]
    assert (pacs.ae_title, pacs.host, pacs.port) == ("ORTHANC", "127.0.0.1", 104)


def test_keys_of_the_flat_layout_are_refused_with_their_new_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configuration written for release 0.1 (flat keys) stops start-up with the new key,
    in a file and in the environment, instead of being ignored."""
    config = tmp_path / "old.yaml"
    config.write_text("dimse_port: 104\nquiet_period_s: 5\n")
    with pytest.raises(ConfigError, match=r"dimse_port \(now scp\.dimse_port\)") as info:
        load_settings(config)
    assert "router.quiet_period_s" in str(info.value) and str(config) in str(info.value)
    monkeypatch.setenv("AIROUTER_TRITON_URL", "triton:8000")
    with pytest.raises(ConfigError, match="AIROUTER_INFERENCE__TRITON_URL"):
        load_settings()
    monkeypatch.delenv("AIROUTER_TRITON_URL")
    monkeypatch.setenv("AIROUTER_DESTINATIONS__PACS__PORT", "104")
    with pytest.raises(ConfigError, match="AIROUTER_DISPATCH__DESTINATIONS"):
        load_settings()


def test_each_stage_gets_a_sub_tree_and_enums_are_checked(tmp_path: Path) -> None:
    from airouter.core.vocab import DeadlineAction, TritonProtocol

    s = load_settings(router={"deadline_action": "discard"}, inference={"protocol": "grpc"})
    assert s.router.deadline_action is DeadlineAction.DISCARD
    assert s.inference.protocol is TritonProtocol.GRPC
    config = tmp_path / "bad.yaml"
    config.write_text("router: {deadline_action: forget}\n")
    with pytest.raises(ConfigError, match=r"router\.deadline_action"):
        load_settings(config)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("scp: {ae_title: 'BACK\\\\SLASH'}\n", "scp.ae_title"),
        ("scp: {ae_title: WAYTOOLONGFORANAETITLE}\n", "scp.ae_title"),
        ("scp: {dimse_port: 70000}\n", "scp.dimse_port"),
        ("no_such_setting: 1\n", "no_such_setting"),
        ("scp: {no_such_setting: 1}\n", "scp.no_such_setting"),
        ("dispatch: {destinations: {pacs: {ae_title: X, host: h, port: 1, tls: true}}}\n", "tls"),
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
        dispatch={
            "destinations": {
                "tps": {
                    "ae_title": "TPS",
                    "host": "tps",
                    "port": 104,
                    "tls": {"ca_file": "/ca.pem"},
                },
                "web": {"kind": "dicomweb", "url": "https://pacs/dicom-web", "token": "t"},
                "rest": {"kind": "orthanc", "url": "http://orthanc:8042"},
                "out": {"kind": "folder", "path": "/srv/out"},
            }
        }
    )
    kinds = {name: type(node).__name__ for name, node in s.dispatch.destinations.items()}
    assert kinds == {
        "pacs": "DicomNode",
        "tps": "DicomNode",
        "web": "DicomWebNode",
        "rest": "OrthancNode",
        "out": "FolderNode",
    }
    with pytest.raises(ConfigError, match=r"dispatch\.destinations\.web\.dicomweb\.url"):
        load_settings(dispatch={"destinations": {"web": {"kind": "dicomweb", "url": "ftp://x"}}})
    with pytest.raises(ConfigError, match=r"dispatch\.destinations\.x"):
        load_settings(dispatch={"destinations": {"x": {"kind": "carrier-pigeon", "path": "/"}}})


def test_one_receiver_process_per_core_unless_told() -> None:
    assert load_settings().scp.processes == (os.cpu_count() or 1)
    assert load_settings(scp={"processes": 1}).scp.processes == 1
    with pytest.raises(ConfigError, match=r"scp\.processes"):
        load_settings(scp={"processes": 0})
