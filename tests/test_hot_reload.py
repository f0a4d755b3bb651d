"""Rules reload while the node runs; a broken edit keeps the previous rules in force."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pydicom
import pytest

from router.registry import RuleSet
from router.rules import RuleError
from tests.peers import MR_EPI, ROOT, start_node, stop_process, storescu, wait_for

MR_RULE = """rules:
  - name: forward-mr
    action: forward
    match: {Modality: MR}
    select: {orientation: null}
    destinations: [pacs]
"""


def _touch_write(path: Path, text: str) -> None:
    path.write_text(text)
    stamp = time.time() + 1  # a distinct mtime even on coarse-grained filesystems
    os.utime(path, (stamp, stamp))


def test_ruleset_reloads_and_rejects_broken_edits(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    ruleset = RuleSet(tmp_path / "rules")
    before = [r.name for r in ruleset.rules]
    assert ruleset.check() is False  # nothing changed
    _touch_write(tmp_path / "rules" / "zz-mr.yaml", MR_RULE)
    assert ruleset.check() is True
    assert {r.name for r in ruleset.rules} == {*before, "forward-mr"}
    _touch_write(
        tmp_path / "rules" / "zz-mr.yaml", MR_RULE.replace("action: forward", "action: fly")
    )
    assert ruleset.check() is True
    assert {r.name for r in ruleset.rules} == {*before, "forward-mr"}  # still in force
    assert ruleset.error and "zz-mr.yaml:3: rules.0.action" in ruleset.error
    (tmp_path / "rules" / "zz-mr.yaml").unlink()
    assert ruleset.check() is True and ruleset.error is None
    assert [r.name for r in ruleset.rules] == before


def test_a_follower_started_during_a_broken_edit_applies_the_rules_in_force(
    tmp_path: Path,
) -> None:
    """The node keeps a copy of the files it accepted; a worker process that starts while the
    files hold a rejected edit (one restarted after a crash) applies the node's rules and
    reports the node's error, and follows the files once they are fixed. The node itself
    still refuses to start on them, and the copy never holds a rejected edit."""
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    in_force = tmp_path / "var" / "rules-in-force" / "node"
    node = RuleSet(tmp_path / "rules", in_force=in_force)
    before = [r.name for r in node.rules]
    _touch_write(tmp_path / "rules" / "zz-mr.yaml", MR_RULE)
    assert node.check() and {r.name for r in node.rules} == {*before, "forward-mr"}
    assert (in_force / "zz-mr.yaml").read_text() == MR_RULE
    assert len(list(in_force.parent.iterdir())) == 2  # the link and one version
    broken = MR_RULE.replace("action: forward", "action: fly")
    _touch_write(tmp_path / "rules" / "zz-mr.yaml", broken)
    assert node.check() and node.error
    assert (in_force / "zz-mr.yaml").read_text() == MR_RULE  # what is in force

    worker = RuleSet(tmp_path / "rules", in_force=in_force, follow=True)
    assert [r.name for r in worker.rules] == [r.name for r in node.rules]
    assert worker.error == node.error and "zz-mr.yaml:3: rules.0.action" in worker.error
    with pytest.raises(RuleError, match=r"zz-mr\.yaml:3"):
        RuleSet(tmp_path / "rules", in_force=in_force)  # the node: fatal at start
    (tmp_path / "rules" / "zz-mr.yaml").unlink()
    assert worker.check() and worker.error is None
    assert [r.name for r in worker.rules] == before
    assert (in_force / "zz-mr.yaml").exists()  # a follower never writes the copy


def test_validator_rejects_rules_the_node_cannot_run(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("rules:\n  - {name: x, models: [no-such-model]}\n")

    def validate(rules: object) -> None:
        raise RuleError("rule x: no model card for no-such-model")

    with pytest.raises(RuleError, match="no model card"):
        RuleSet(tmp_path, validate)


@pytest.mark.integration
def test_editing_rules_while_the_node_runs(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    node = start_node(
        tmp_path / "node",
        None,
        wait_triton=False,
        router={"rules_dir": str(rules)},
        inference={"triton_url": "127.0.0.1:9"},
    )
    try:
        files = sorted(MR_EPI.glob("*.dcm"))
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        assert storescu(node.dimse_port, files).returncode == 0
        wait_for(
            lambda: node.get(f"/api/events?study={study}&kind=no_rule_matched"),
            30,
            "the MR study to complete unmatched",
        )
        dry = node.get(f"/api/studies/{study}/rules")
        assert not any(r["matched"] for r in dry["rules"])
        assert all(r["reason"] for r in dry["rules"])

        _touch_write(rules / "zz-mr.yaml", MR_RULE)
        wait_for(
            lambda: "forward-mr" in [r["name"] for r in node.get("/api/rules")["rules"]],
            15,
            "the new rule to be in force",
        )
        dry = node.get(f"/api/studies/{study}/rules")
        assert [r["rule"] for r in dry["rules"] if r["matched"]] == ["forward-mr"]

        _touch_write(rules / "zz-mr.yaml", MR_RULE + "    colour: red\n")
        status = wait_for(
            lambda: (s := node.get("/api/rules")) and s["error"] and s,
            15,
            "the broken edit to be rejected",
        )
        assert "zz-mr.yaml:7: rules.0.colour" in status["error"]
        assert "forward-mr" in [r["name"] for r in status["rules"]]  # old rules in force
        events = node.get("/api/events?kind=rules_rejected")
        assert events and "colour" in events[-1]["detail"]
        assert node.process.poll() is None
    finally:
        stop_process(node.process)
