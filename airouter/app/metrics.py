"""``GET /metrics``: what the processes counted (``airouter.core.metrics``, summed over the
node's processes in multiprocess mode) and what is read at the scrape: the queue by priority,
jobs and deliveries by state (from the state store, which every node shares: the same on every
node, so take ``max`` over instances, not ``sum``), Triton and each model ready, free space.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from airouter.core.db import (
    Delivery,
    NotificationDelivery,
    Store,
    jobs_by_state,
    queued_by_priority,
)
from airouter.core.metrics import MULTIPROC_ENV
from airouter.core.settings import MonitoringSettings
from airouter.core.vocab import DeliveryState, JobState, Priority
from airouter.jobs.monitoring import rejections, summarise


class StateCollector(Collector):
    """Gauges read from the state store and the node's probes at each scrape."""

    def __init__(
        self,
        store: Store,
        health: Callable[[], dict[str, Any]],
        data_dir: Path,
        monitoring: MonitoringSettings | None = None,
    ) -> None:
        self.monitoring = monitoring or MonitoringSettings()
        self.store = store
        self.health = health
        self.data_dir = data_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One family per gauge."""
        with self.store.session() as s:
            queued, jobs = queued_by_priority(s), jobs_by_state(s)
            deliveries = s.execute(
                select(Delivery.state, Delivery.destination, func.count()).group_by(
                    Delivery.state, Delivery.destination
                )
            ).all()
            stats = summarise(s, self.monitoring)
            refused = rejections(s)
            notified = s.execute(
                select(
                    NotificationDelivery.state, NotificationDelivery.receiver, func.count()
                ).group_by(NotificationDelivery.state, NotificationDelivery.receiver)
            ).all()
        queue = GaugeMetricFamily(
            "airouter_queue_depth",
            "Jobs queued, by priority (the whole database)",
            labels=["priority"],
        )
        for p in Priority:
            queue.add_metric([p.value], queued.get(p.rank, 0))
        yield queue
        by_state = GaugeMetricFamily(
            "airouter_jobs", "Jobs by state (the whole database)", labels=["state"]
        )
        for state in JobState:
            by_state.add_metric([state.value], jobs.get(state, 0))
        yield by_state
        outbox = GaugeMetricFamily(
            "airouter_deliveries",
            "Deliveries by state and destination (the whole database)",
            labels=["state", "destination"],
        )
        seen = {(DeliveryState(st), dest): n for st, dest, n in deliveries}
        for destination in sorted({dest for _, dest in seen}):
            for d_state in DeliveryState:
                n = seen.get((d_state, destination), 0)
                outbox.add_metric([d_state.value, destination], n)
        yield outbox
        notifications = GaugeMetricFamily(
            "airouter_notifications",
            "Notifications (webhook, FHIR) by state and receiver (the whole database)",
            labels=["state", "receiver"],
        )
        told = {(DeliveryState(st), name): n for st, name, n in notified}
        for receiver in sorted({name for _, name in told}):
            for n_state in (
                DeliveryState.PENDING,
                DeliveryState.SENT,
                DeliveryState.FAILED,
                DeliveryState.DEAD,
            ):
                notifications.add_metric(
                    [n_state.value, receiver], told.get((n_state, receiver), 0)
                )
        yield notifications
        labels = ["model", "version", "dimension", "value"]
        dice = GaugeMetricFamily(
            "airouter_model_dice_median",
            "Median Dice against the structure sets clinicians sent back, by model version and "
            "subgroup",
            labels=labels,
        )
        cases = GaugeMetricFamily(
            "airouter_model_evaluated_cases",
            "Results compared, by model version and subgroup",
            labels=labels,
        )
        flagged = GaugeMetricFamily(
            "airouter_model_subgroup_flagged",
            "1 if the subgroup's median Dice is below the threshold or the others' (the alert)",
            labels=labels,
        )
        for x in stats:
            key = [x.model, x.version, x.dimension, x.value]
            dice.add_metric(key, x.median_dice)
            cases.add_metric(key, x.cases)
            flagged.add_metric(key, 1 if x.flagged else 0)
        yield dice
        yield cases
        yield flagged
        rejected = GaugeMetricFamily(
            "airouter_model_reviews_rejected",
            "Reviewed results rejected, by model and subgroup",
            labels=["model", "dimension", "value"],
        )
        for r in refused:
            rejected.add_metric([r["model"], r["dimension"], r["value"]], r["rejected"])
        yield rejected
        status = self.health()
        triton = GaugeMetricFamily("airouter_triton_ready", "1 if the Triton server is ready")
        triton.add_metric([], 1 if status.get("triton_ready") else 0)
        yield triton
        models = GaugeMetricFamily(
            "airouter_model_ready",
            "1 if Triton has the model ready (the models the rules in force run)",
            labels=["model"],
        )
        ready = status.get("models_ready") or {}
        for name in sorted(status.get("models_in_use", ready)):  # no alert for one not loaded
            models.add_metric([name], 1 if ready.get(name) else 0)
        yield models
        disk = shutil.disk_usage(self.data_dir)
        free = GaugeMetricFamily(
            "airouter_free_bytes", "Free space of the data directory's filesystem"
        )
        free.add_metric([], disk.free)
        yield free


def scraper(
    store: Store,
    health: Callable[[], dict[str, Any]],
    data_dir: Path,
    monitoring: MonitoringSettings | None = None,
) -> Callable[[], bytes]:
    """What ``/metrics`` answers, in Prometheus text format."""
    state = StateCollector(store, health, data_dir, monitoring)

    def scrape() -> bytes:
        counted: CollectorRegistry = REGISTRY  # this process's counts
        if os.environ.get(MULTIPROC_ENV):  # every process's (the files they count into)
            from prometheus_client import multiprocess

            counted = CollectorRegistry()
            multiprocess.MultiProcessCollector(counted)
        read = CollectorRegistry()
        read.register(state)
        return generate_latest(counted) + generate_latest(read)

    return scrape
