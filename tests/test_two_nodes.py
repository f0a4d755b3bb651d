"""Two nodes on one PostgreSQL and one spool (issue 12, acceptance 2): any node receives any
instance of a study, the study completes once, each result reaches Orthanc once, and the work
of a node killed mid-job is finished by the other after its lease (the killed node's Triton
answers nothing, so the job it claimed is surely in flight when it dies)."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, select

from airouter.core.db import Event, Job
from airouter.core.vocab import JobState
from inference.triton import LocalTriton
from tests.peers import (
    Postgres,
    free_port,
    start_node,
    start_orthanc,
    stop_process,
    tool,
    wait_for,
)
from tests.phantoms import chest_phantom, write_ct_series

pytestmark = pytest.mark.integration

STUDIES = 20


def _rules(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rule = {
        "name": "segment-ct",
        "match": {"Modality": "CT"},
        "select": {"min_instances": 5},
        "models": ["ct-body"],
        "outputs": ["SEG", "SR"],
        "destinations": ["pacs"],
    }
    (directory / "r.yaml").write_text(yaml.safe_dump({"rules": [rule]}))
    return directory


def _storescu(port: int, files: list[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [tool("storescu"), "-aec", "AIROUTER", "127.0.0.1", str(port), *map(str, files)],
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_two_nodes_share_the_work_and_finish_a_killed_nodes_job(
    tmp_path: Path, postgres: Postgres, triton: LocalTriton
) -> None:
    url = postgres.new_database()
    orthanc = start_orthanc(tmp_path / "orthanc")
    common = {
        "database_url": url,
        "data_dir": str(tmp_path / "shared"),  # one spool, archive and job folder
        "router": {"rules_dir": str(_rules(tmp_path / "rules")), "quiet_period_s": 1.0},
        "inference": {"triton_url": triton.url("http"), "retry_max_s": 0.5},
        "jobs": {"workers": 1, "lease_s": 3.0},
    }
    # Node A's Triton answers nothing: the job it claims stays in flight (waiting for
    # inference) until A is killed, as a job on a node that dies mid-run would.
    dead_triton = {**common["inference"], "triton_url": f"127.0.0.1:{free_port()}"}
    a = start_node(
        tmp_path / "a",
        orthanc,
        wait_triton=False,
        node_name="node-a",
        **{**common, "inference": dead_triton},
    )
    b = start_node(tmp_path / "b", orthanc, node_name="node-b", **common)
    engine = create_engine(url)
    try:
        studies = []
        for k in range(STUDIES):
            p = chest_phantom(slices=12, size=48)
            p.hu[:, :, : k % 5] = -1000
            study, files = write_ct_series(p.hu, p.affine, tmp_path / f"s{k}")
            senders = [_storescu(a.dimse_port, files[0::2]), _storescu(b.dimse_port, files[1::2])]
            for sender in senders:
                assert sender.wait(timeout=60) == 0, sender.stderr.read() if sender.stderr else ""
            studies.append(study)

        def running_on_a() -> list[int]:
            with engine.connect() as conn:
                return list(
                    conn.scalars(
                        select(Job.id).where(
                            Job.lease_owner.like("node-a/%"), Job.state.in_(_in_flight())
                        )
                    )
                )

        try:
            wait_for(running_on_a, 120, "a job in flight on node A")
        except TimeoutError as exc:
            with engine.connect() as conn:
                rows = conn.execute(select(Job.id, Job.state, Job.lease_owner)).all()
            raise AssertionError(
                f"{exc}; jobs: {rows}\nA: {a.log_text()[-3000:]}\nB: {b.log_text()[-3000:]}"
            ) from exc
        stop_process(a.process, signal.SIGKILL)
        cut_off = running_on_a()  # still in flight after the kill: A cannot finish them

        def all_done() -> bool:
            with engine.connect() as conn:
                states = conn.execute(select(Job.state)).scalars().all()
            assert JobState.FAILED not in states, b.log_text()[-3000:]
            return len(states) == STUDIES and set(states) == {JobState.DONE}

        wait_for(all_done, 300, "every job done", every_s=1.0)
        with engine.connect() as conn:
            completions = Counter(
                conn.execute(select(Event.study_uid).where(Event.kind == "study_complete"))
                .scalars()
                .all()
            )
            jobs = conn.execute(select(Job.id, Job.study_uid, Job.attempts, Job.lease_owner)).all()
        assert completions == Counter(studies)  # each study completed once
        assert Counter(j.study_uid for j in jobs) == Counter(studies)  # one job per study
        assert cut_off, "node A finished its job in the moment it was killed: run again"
        taken_over = [j for j in jobs if j.id in cut_off]
        assert all(j.attempts == 2 and j.lease_owner.startswith("node-b/") for j in taken_over)
        results: Counter[tuple[str, str]] = Counter()
        for series in orthanc.get("/series?expand") or []:
            modality = series["MainDicomTags"].get("Modality")
            if modality in ("SEG", "SR"):
                parent = orthanc.get(f"/studies/{series['ParentStudy']}")
                uid = parent["MainDicomTags"]["StudyInstanceUID"]
                results[(uid, modality)] += len(series["Instances"])
        expected = Counter({(uid, m): 1 for uid in studies for m in ("SEG", "SR")})
        assert results == expected  # each result exactly once in Orthanc
        # any node's DICOMweb serves the whole archive: B answers for what A received
        assert len(b.get("/dicomweb/studies")) == STUDIES
    finally:
        engine.dispose()
        for node in (a, b):
            if node.process.poll() is None:
                stop_process(node.process)
        stop_process(orthanc.process)


def _in_flight() -> list[JobState]:
    return [s for s in JobState if s.in_flight]
