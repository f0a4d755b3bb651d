"""Crash safety: SIGKILL in the middle of a transfer loses no acknowledged instance, and the
study still completes once and produces its results once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.peers import (
    fresh_copy,
    head_ct_files,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.integration


def acknowledged(storescu_log: str) -> list[str]:
    """Files storescu saw a success response for (from its -v log)."""
    done, current = [], None
    for line in storescu_log.splitlines():
        if line.startswith("I: Sending file: "):
            current = line.removeprefix("I: Sending file: ").strip()
        elif "Received Store Response (Success)" in line and current:
            done.append(current)
            current = None
    return done


def test_sigkill_mid_transfer_then_restart_and_resend(tmp_path: Path) -> None:
    orthanc = start_orthanc(tmp_path / "orthanc")
    files = fresh_copy(head_ct_files(), tmp_path / "ct", count=300)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    node = start_node(tmp_path / "node", orthanc)
    try:
        log_path = tmp_path / "storescu.log"
        with open(log_path, "w") as log:
            sender = subprocess.Popen(
                [
                    "storescu",
                    "-v",
                    "-aec",
                    "AIROUTER",
                    "127.0.0.1",
                    str(node.dimse_port),
                    *map(str, files),
                ],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

            def indexed() -> int:
                rows = node.get(f"/dicomweb/studies/{study}/series") or []
                return int(rows[0]["00201209"]["Value"][0]) if rows else 0

            wait_for(lambda: indexed() >= 100, 60, "100 instances indexed", every_s=0.02)
            node.process.send_signal(signal.SIGKILL)
            node.process.wait()
            assert sender.wait(timeout=60) != 0  # the transfer was cut
        acked = acknowledged(log_path.read_text())
        assert 100 <= len(acked) < 300

        # same data directory; a short grace, then no resend for a while
        node = start_node(
            tmp_path / "node", orthanc, router={"restart_grace_s": 1.0, "quiet_period_s": 1.0}
        )
        stored = {
            row["00080018"]["Value"][0]
            for row in node.get(f"/dicomweb/studies/{study}/series/{series}/instances") or []
        }
        acked_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in acked}
        assert acked_uids <= stored, "an acknowledged instance was lost"
        assert not node.get(f"/api/jobs?study={study}"), "a partial study was routed"
        (held,) = node.get(f"/api/events?study={study}&kind=study_interrupted")
        assert "deadline" in held["detail"]
        # Well past the grace and the quiet period, the partial series is still not routed:
        # the modality may be slow to resend, and 100 of 300 slices is not the study.
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            assert not node.get(f"/api/jobs?study={study}"), "a partial study was routed"
            time.sleep(0.25)
        assert not node.get(f"/api/events?study={study}&kind=study_complete")

        resent = storescu(node.dimse_port, files)  # the sender retries the whole transfer
        assert resent.returncode == 0, resent.stderr
        job = wait_for(
            lambda: (
                (j := node.get(f"/api/jobs?study={study}")) and j[0]["state"] == "done" and j[0]
            ),
            240,
            "the study's job",
        )
        assert job["instance_count"] == 300
        assert len(node.get(f"/api/jobs?study={study}")) == 1
        completions = node.get(f"/api/events?study={study}&kind=study_complete")
        assert len(completions) == 1
        segs = [
            s
            for s in orthanc.get("/series?expand") or []
            if s["MainDicomTags"].get("Modality") == "SEG"
        ]
        assert len(segs) == 1
    finally:
        stop_process(node.process)
        stop_process(orthanc.process)
