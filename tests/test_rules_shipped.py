"""Every rule file in rules/ exercised on real data; the rule tools; STAT before routine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from airouter.app.rules_cli import read_studies
from airouter.core.db import Job, Store
from airouter.core.vocab import Action, JobState, Priority
from router.engine import StudyContext, decide, explain
from router.queue import claim_next_job
from router.rules import load_rules
from tests.peers import HEAD_CT, MR_EPI, ROOT, SHARED_DICOM

RULES = load_rules(ROOT / "rules")
HEAD_STUDY = HEAD_CT.parent  # the axial CT and its scout
RT = SHARED_DICOM / "rt-dicompyler/tests/testdata/example_data"


def _context(folder: Path, calling_ae: str | None = None) -> StudyContext:
    studies, _ = read_studies([folder])
    assert len(studies) == 1
    (series,) = studies.values()
    return StudyContext(series, calling_ae=calling_ae)


def test_routine_ct_rule_selects_the_axial_series_not_the_scout() -> None:
    (decision,) = decide(_context(HEAD_STUDY, "MODALITY"), RULES)
    assert decision.rule.name == "ct-body-lungs"
    assert decision.rule.priority is Priority.ROUTINE
    assert decision.series_uid == "1.3.46.670589.33.1.3963937485511329090.25659488233390035616"


def test_emergency_ct_is_stat_and_stops_the_routine_rule() -> None:
    verdicts = {v.rule.name: v for v in explain(_context(HEAD_STUDY, "ER_CT2"), RULES)}
    assert verdicts["ct-emergency-stat"].matched
    assert verdicts["ct-emergency-stat"].rule.priority is Priority.STAT
    assert not verdicts["ct-body-lungs"].matched
    assert verdicts["ct-body-lungs"].reason.startswith("not evaluated")


def test_rt_plans_are_forwarded_and_mr_matches_nothing() -> None:
    studies, _ = read_studies([RT / "rtplan.dcm"])
    (series,) = studies.values()
    (decision,) = decide(StudyContext(series), RULES)
    assert decision.rule.name == "forward-rt-plans-and-doses"
    assert decision.rule.action is Action.FORWARD
    assert decide(_context(MR_EPI), RULES) == []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airouter.app.cli", "rules", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_rules_check_exit_status_and_error_lines(tmp_path: Path) -> None:
    ok = _cli("check")
    assert ok.returncode == 0 and "3 rule(s) valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "rules:\n  - name: x\n    models: [ct-body]\n    match: {Modality: {regx: CT}}\n"
    )
    failed = _cli("check", str(tmp_path))
    assert failed.returncode == 1
    assert f"{bad}:4: rules.0.match.Modality.regx" in failed.stderr


def test_rules_test_explains_the_shared_head_ct() -> None:
    result = _cli("test", str(SHARED_DICOM / "ct-philips-head-phantom"), "--explain")
    assert result.returncode == 0
    out = result.stdout
    assert "MATCH ct-body-lungs [routine]: run ct-body, ct-lungs -> SEG, SR, RTSTRUCT" in out
    assert "LOCALIZER" in out and "140 instance(s)" in out
    assert "no    ct-emergency-stat: none of: calling_ae regex ^ER_ (seen: None)" in out
    assert "no    forward-rt-plans-and-doses: no series qualifies" in out
    assert "skipped" in out and "DIRFILE" in out


def test_stat_job_runs_before_the_queued_routine_jobs(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with store.session() as s:
        for n in range(20):
            s.add(
                Job(
                    study_uid=f"1.2.{n}",
                    series_uid="1.3",
                    rule="routine",
                    models=["m"],
                    outputs=[],
                    destinations=[],
                    priority=Priority.ROUTINE.rank,
                )
            )
    started = [claim_next_job(store) for _ in range(3)]  # a worker took three routine jobs
    with store.session() as s:
        stat = Job(
            study_uid="9.9",
            series_uid="9.9.1",
            rule="stat",
            models=["m"],
            outputs=[],
            destinations=[],
            priority=Priority.STAT.rank,
        )
        s.add(stat)
    nxt = claim_next_job(store)
    assert nxt == stat.id and None not in started
    with store.session() as s:
        assert s.get(Job, nxt).state is JobState.RUNNING  # type: ignore[union-attr]
        queued = s.query(Job).filter(Job.state == JobState.QUEUED).count()
    assert queued == 17  # the remaining routine jobs come after it


def test_off_hours_window_and_deferred_routine_work(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from router.schedule import OffHours

    window = OffHours.parse("19:00", "07:00")
    local = datetime(2026, 11, 26, 12, 30).astimezone()  # midday: closed
    start = window.not_before(local)
    assert start == datetime(2026, 11, 26, 19, 0).astimezone().astimezone(UTC).replace(tzinfo=None)
    assert window.not_before(datetime(2026, 11, 26, 23, 0).astimezone()) is None  # open
    assert window.not_before(datetime(2026, 11, 27, 6, 59).astimezone()) is None  # still open
    assert OffHours.parse("01:00", "05:00").contains(datetime(2026, 1, 1, 3).time())

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    later = datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=3)
    with store.session() as s:
        deferred = Job(
            study_uid="1.1",
            series_uid="1.2",
            rule="night",
            models=["m"],
            outputs=[],
            destinations=[],
            priority=Priority.ROUTINE.rank,
            not_before=later,
        )
        s.add(deferred)
    assert claim_next_job(store) is None  # waits for its window
    with store.session() as s:
        s.get(Job, deferred.id).not_before = datetime(2000, 1, 1)  # type: ignore[union-attr]
    assert claim_next_job(store) == deferred.id


def test_any_keyword_can_be_tested(tmp_path: Path) -> None:
    """Conditions are not limited to a fixed list: here KVP and ConvolutionKernel."""
    from router.rules import load_rule_file

    path = tmp_path / "r.yaml"
    path.write_text(
        "rules:\n  - name: k\n    models: [ct-body]\n"
        "    match: {KVP: {range: {min: 100, max: 140}}, ConvolutionKernel: {present: true}}\n"
    )
    (decision,) = decide(_context(HEAD_STUDY), load_rule_file(path))
    assert decision.rule.name == "k"
    path.write_text(path.read_text().replace("min: 100", "min: 130"))
    verdict = explain(_context(HEAD_STUDY), load_rule_file(path))[0]
    assert not verdict.matched and "KVP range [130.0, 140.0]" in verdict.reason
