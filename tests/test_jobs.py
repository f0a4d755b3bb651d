"""A job's life in the store: the recorder, recovery after crashes, retry and cancel (in
process, no peers; the node-level test is tests/test_lifecycle_and_phi.py)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from airouter.app.web import create_app
from airouter.core.db import Event, Job, Store, Study
from airouter.core.vocab import Action, JobState, SegType
from airouter.jobs.artefacts import load_masks, save_masks
from airouter.jobs.lifecycle import JobActionError, cancel_job, recover_jobs, retry_job
from airouter.jobs.recorder import JobCancelled, JobRecorder
from router.queue import claim_next_job


@pytest.fixture
def store(database_url: str) -> Store:
    """The state store on SQLite and on PostgreSQL."""
    return Store(database_url)


def _job(store: Store, state: JobState = JobState.QUEUED, attempts: int = 0) -> int:
    with store.session() as s:
        if s.get(Study, "1.2.3") is None:
            s.add(Study(study_uid="1.2.3"))
        job = Job(
            study_uid="1.2.3",
            series_uid="1.2.3.4",
            rule="segment-ct",
            action=Action.RUN,
            models=["ct-body"],
            outputs=["SEG"],
            destinations=[],
            seg_type=SegType.LABELMAP,
            state=state,
            attempts=attempts,
        )
        s.add(job)
        s.flush()
        return job.id


def _get(store: Store, job_id: int) -> Job:
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _commits(store: Store) -> list[int]:
    """Counts each transaction the engine commits."""
    from sqlalchemy import event

    counted: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: counted.append(1))
    return counted


def test_the_recorder_writes_timings_and_events_with_the_transition(store: Store) -> None:
    job_id = _job(store, JobState.RUNNING)
    commits = _commits(store)
    recorder = JobRecorder(store, job_id)
    recorder.time(volume_s=0.5, inference_s=1.25)
    recorder.event("job_scores", {"m": {"x": 0.5}})
    assert commits == []  # nothing written yet
    recorder.transition(JobState.ENCODING)
    assert len(commits) == 1
    job = _get(store, job_id)
    assert job.state is JobState.ENCODING
    assert job.timings == {"volume_s": 0.5, "inference_s": 1.25}
    with store.session() as s:
        kinds = s.scalars(select(Event.kind).where(Event.job_id == job_id)).all()
    assert kinds == ["job_scores"]
    recorder.time(encode_s=2.0)
    recorder.transition(JobState.DONE)
    job = _get(store, job_id)
    assert job.timings["encode_s"] == 2.0 and job.timings["volume_s"] == 0.5
    assert job.finished_at is not None  # an ended state stamps the end


def test_a_cancelled_job_refuses_every_later_transition(store: Store) -> None:
    job_id = _job(store, JobState.WAITING_INFERENCE)
    recorder = JobRecorder(store, job_id)
    cancel_job(store, job_id, actor="tester")
    with pytest.raises(JobCancelled):
        recorder.transition(JobState.RUNNING)
    assert _get(store, job_id).state is JobState.CANCELLED


def test_recovery_requeues_interrupted_jobs_and_fails_those_at_the_cap(store: Store) -> None:
    fresh = _job(store, JobState.RUNNING, attempts=1)
    waiting = _job(store, JobState.WAITING_INFERENCE, attempts=2)
    crasher = _job(store, JobState.ENCODING, attempts=3)
    finished = _job(store, JobState.DONE, attempts=3)
    result = recover_jobs(store, max_attempts=3)
    assert sorted(result.requeued) == [fresh, waiting] and result.failed == [crasher]
    assert _get(store, fresh).state is JobState.QUEUED
    failed = _get(store, crasher)
    assert failed.state is JobState.FAILED
    assert failed.error and "stopped 3 times" in failed.error and "encoding" in failed.error
    assert _get(store, finished).state is JobState.DONE
    with store.session() as s:
        assert s.scalar(select(Event.detail).where(Event.job_id == crasher)) == failed.error


def test_claiming_counts_an_attempt_and_claims_once(store: Store) -> None:
    job_id = _job(store)
    assert claim_next_job(store) == job_id
    assert _get(store, job_id).attempts == 1
    assert claim_next_job(store) is None  # running: not claimed twice


def test_retry_makes_the_next_version_and_cancel_only_what_waits(store: Store) -> None:
    done = _job(store, JobState.DONE)
    with pytest.raises(JobActionError) as info:
        retry_job(store, done, actor="tester")
    assert info.value.status == 409
    failed = _job(store, JobState.FAILED)
    again = retry_job(store, failed, actor="tester")
    job = _get(store, again)
    assert (job.state, job.retry_of, job.seg_type, job.attempts) == (
        JobState.QUEUED,
        failed,
        SegType.LABELMAP,
        0,
    )
    with store.session() as s:
        latest = s.scalar(select(func.max(Job.version)))
    assert job.version == latest and job.version > _get(store, failed).version
    with pytest.raises(JobActionError) as info:
        cancel_job(store, _job(store, JobState.RUNNING), actor="tester")
    assert info.value.status == 409
    with pytest.raises(JobActionError) as info:
        retry_job(store, 999, actor="tester")
    assert info.value.status == 404


def test_retry_and_cancel_over_the_api_are_audited(store: Store) -> None:
    woken: list[int] = []
    client = TestClient(create_app(store, lambda: {}, on_job_queued=lambda: woken.append(1)))
    queued = _job(store)
    answer = client.post(f"/api/jobs/{queued}/cancel?actor=alice")
    assert answer.status_code == 200 and answer.json()["state"] == "cancelled"
    assert client.post(f"/api/jobs/{queued}/cancel").status_code == 409
    assert claim_next_job(store) is None  # a cancelled job is never claimed
    retried = client.post(f"/api/jobs/{queued}/retry?actor=bob")
    assert retried.status_code == 200, retried.text
    body = retried.json()
    assert body["state"] == "queued" and body["version"] == 2 and woken == [1]
    assert client.post("/api/jobs/12345/retry").status_code == 404
    assert client.post("/api/jobs/12345/retry").json()["status"] == 404
    events = {e["kind"]: e["detail"] for e in client.get("/api/events").json()}
    assert "alice" in events["job_cancelled"] and "bob" in events["job_retried"]


def test_a_database_of_release_0_1_opens_in_place(tmp_path: Path) -> None:
    """The enum columns read the text the 0.1 columns held; new columns are added; a new job
    (with a state 0.1 did not know) is written next to the old ones."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript((Path(__file__).parent / "data" / "schema-0.1.sql").read_text())
        db.execute(
            "INSERT INTO studies VALUES ('1.2', 'COMPLETE', NULL, NULL, NULL, NULL, NULL, NULL,"
            " NULL, '2026-11-26', '2026-11-26', '2026-11-26', NULL)"
        )
        db.execute(
            "INSERT INTO jobs (id, study_uid, series_uid, rule, action, models, outputs,"
            " destinations, instance_count, version, priority, state, attempts, timings,"
            " options, created_at) VALUES (1, '1.2', '1.2.3', 'r', 'forward', '[]', '[]',"
            " '[\"pacs\"]', 3, 1, 100, 'QUEUED', 0, '{}', '{\"seg_type\": \"labelmap\"}',"
            " '2026-11-26')"
        )
        db.execute("INSERT INTO outputs VALUES (1, 1, 'ORIGINAL', '1.2.3.4', '1.2.3', '/x')")
        db.execute(
            "INSERT INTO deliveries VALUES (1, 1, 'pacs', 'SENT', 1, '2026-11-26', 'ok',"
            " '2026-11-26', 'requested', '9.9')"
        )
    store = Store(f"sqlite:///{path}")
    from airouter.core.db import Delivery, Output
    from airouter.core.vocab import CommitmentState, OutputKind

    old = _get(store, 1)
    assert (old.action, old.state, old.seg_type, old.options) == (
        Action.FORWARD,
        JobState.QUEUED,
        None,
        {"seg_type": "labelmap"},
    )
    with store.session() as s:
        assert s.get(Output, 1).kind is OutputKind.ORIGINAL  # type: ignore[union-attr]
        assert s.get(Delivery, 1).commitment is CommitmentState.REQUESTED  # type: ignore[union-attr]
    new = _job(store, JobState.CANCELLED)
    assert _get(store, new).seg_type is SegType.LABELMAP
    assert claim_next_job(store) == 1  # the old queued job runs


def test_masks_kept_with_a_job_come_back_as_saved_empty_ones_unstored(tmp_path: Path) -> None:
    """A job's masks, packed; an empty one (lungs on a head CT) is named, not stored, and
    comes back as zeros of the same shape."""
    rng = np.random.default_rng(7)
    found = rng.random((5, 16, 24)) > 0.5
    save_masks(tmp_path, {"ct-body/Body": found, "ct-lungs/Right Lung": np.zeros_like(found)})
    with zipfile.ZipFile(tmp_path / "masks.npz") as archive:
        assert sorted(archive.namelist()) == ["_empty.npy", "_shape.npy", "ct-body/Body.npy"]
    masks = load_masks(tmp_path / "masks.npz")
    assert list(masks) == ["ct-body/Body", "ct-lungs/Right Lung"]
    assert np.array_equal(masks["ct-body/Body"], found)
    right = masks["ct-lungs/Right Lung"]
    assert right.shape == found.shape and right.dtype == bool and not right.any()
