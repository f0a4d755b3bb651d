"""The node's Prometheus metrics (prometheus-client), counted where things happen.

The stages count here (instances received and refused, bytes, open associations, completion
wait, stage and job durations, delivery latency); what the state store already knows (the
queue, jobs and deliveries by state) and what is measured on demand (Triton, free space) is
read when Prometheus scrapes (``airouter.app.metrics``).

A node runs several processes (``scp.processes``): each writes its counts to files of a folder
of the node's own (prometheus-client's multiprocess mode, :func:`enable_multiprocess`), and
the scrape, whichever process answers it, sums them. Every metric has labels: a labelled
metric makes its values when first counted, after :func:`enable_multiprocess`. Several nodes
are several targets: Prometheus labels each with its ``instance``.
"""

from __future__ import annotations

import os
import shutil
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, values

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# seconds: a C-STORE is milliseconds, a job tens of seconds, a study's quiet period seconds
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SLOW = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)

INSTANCES_RECEIVED = Counter(
    "airouter_instances_received",
    "Instances stored (durable and indexed), by calling AE (STOW-RS: the user) and source",
    ["calling_ae", "source"],
)
INSTANCES_REFUSED = Counter(
    "airouter_instances_refused",
    "Instances refused, by calling AE, source and the DICOM status answered (hex)",
    ["calling_ae", "source", "status"],
)
BYTES_RECEIVED = Counter(
    "airouter_received_bytes", "Bytes of the instances stored, by source", ["source"]
)
OPEN_ASSOCIATIONS = Gauge(
    "airouter_open_associations",
    "DIMSE associations open now, by receiver (native, pynetdicom) and whether over TLS",
    ["receiver", "tls"],
    multiprocess_mode="livesum",
)
COMPLETION_WAIT = Histogram(
    "airouter_study_completion_wait_seconds",
    "From a study's last instance to its completion, by what completed it",
    ["reason"],
    buckets=_SLOW,
)
STAGE_SECONDS = Histogram(
    "airouter_job_stage_seconds",
    "Time a job spent in each stage (volume, inference, masks, encode ...), by model",
    ["stage", "model"],
    buckets=_SLOW,
)
JOB_SECONDS = Histogram(
    "airouter_job_duration_seconds",
    "From a job's start to its end, by rule and how it ended",
    ["rule", "state"],
    buckets=_SLOW,
)
DELIVERY_SECONDS = Histogram(
    "airouter_delivery_latency_seconds",
    "From a result's entry in the outbox to the destination's acceptance, by destination",
    ["destination"],
    buckets=_SLOW,
)
SEND_SECONDS = Histogram(
    "airouter_delivery_attempt_seconds",
    "How long one attempt to send took, by destination and outcome",
    ["destination", "outcome"],
    buckets=_FAST,
)


MAX_CALLING_AE_LABELS = 100  # per process; any AE title a sender claims would be a new series
OTHER_AE = "(other)"
_calling_aes: set[str] = set()
_labels_lock = threading.Lock()


def calling_ae_label(ae: str | None) -> str:
    """The calling AE as a label value: the first ``MAX_CALLING_AE_LABELS`` titles a process
    sees are their own series, later ones count as ``(other)`` (a sender inventing titles
    cannot grow the metrics without bound)."""
    title = (ae or "").strip()
    with _labels_lock:
        if title in _calling_aes:
            return title
        if len(_calling_aes) < MAX_CALLING_AE_LABELS:
            _calling_aes.add(title)
            return title
    return OTHER_AE


_received: dict[tuple[str | None, str], tuple[Any, Any]] = {}


def received_counters(ae: str | None, source: str) -> tuple[Any, Any]:
    """The instances and bytes counters of one calling AE and source (looked up once: the
    ingest counts every instance)."""
    found = _received.get((ae, source))
    if found is None:
        label = calling_ae_label(ae)
        found = (INSTANCES_RECEIVED.labels(label, source), BYTES_RECEIVED.labels(source))
        if len(_received) < 4 * MAX_CALLING_AE_LABELS:
            _received[(ae, source)] = found
    return found


def observe_stages(timings: dict[str, float], models: list[str]) -> None:
    """A job's stage timings (``<stage>_s``; ``<model>_<stage>_s`` for one model's part)."""
    together = ",".join(models) or "none"
    for key, seconds in timings.items():
        if not key.endswith("_s") or seconds < 0:
            continue
        stage, model = key[:-2], together
        for name in models:
            if stage.startswith(f"{name}_"):
                stage, model = stage[len(name) + 1 :], name
                break
        STAGE_SECONDS.labels(stage, model).observe(seconds)


def observe_job(rule: str, state: str, started: datetime | None, ended: datetime | None) -> None:
    """A job that ended: how long from its start."""
    if started is not None and ended is not None:
        JOB_SECONDS.labels(rule, state).observe(max(0.0, (ended - started).total_seconds()))


def enable_multiprocess(folder: Path, fresh: bool) -> None:
    """Count into files of ``folder``, which every process of the node shares (the node
    clears it at start: ``fresh``; its worker processes keep it). Call before anything is
    counted."""
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    values.ValueClass = values.MultiProcessValue()


def process_gone(pid: int) -> None:
    """A process of the node ended: its live gauges (open associations) no longer count."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
