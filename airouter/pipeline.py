"""One job, start to finish: volume -> Triton -> encoders -> archive and outbox.

A job is caught in exactly one place (:func:`run_job`): any failure marks it failed with a
reason that names the stage, and the log line carries the job id and UIDs, never PHI.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from airouter.db import Instance, Job, JobState, Output, Store, Study, utcnow
from airouter.dispatch import add_deliveries, archive_output
from airouter.settings import Settings
from encoders.common import (
    EncodeError,
    Provenance,
    SeriesIdentity,
    Structure,
    ensure_type2,
)
from encoders.rtstruct import build_rtstruct
from encoders.seg import build_probability_seg, build_seg
from encoders.sr import build_measurement_report
from inference.cards import ModelCard, OutputKind
from inference.runner import ModelOutput, run_model
from inference.triton import InferenceClient, InferenceError, InferenceUnavailable
from inference.volume import Volume, VolumeError, build_volume

log = logging.getLogger(__name__)


@dataclass
class PipelineContext:
    store: Store
    settings: Settings
    cards: dict[str, ModelCard]
    client: Callable[[], InferenceClient]  # the inference client (the server may be down)
    on_outputs: Callable[[], None]  # wake the dispatcher
    stopping: threading.Event = field(default_factory=threading.Event)


class JobError(Exception):
    """A job cannot proceed; the message is the reason recorded in the job."""


class JobInterrupted(Exception):
    """The node is stopping while the job waits; it stays where it is and resumes on restart."""


def _set_state(store: Store, job_id: int, state: JobState, **values: object) -> None:
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state = state
        for key, value in values.items():
            setattr(job, key, value)


def _timing(store: Store, job_id: int, **timings: float) -> None:
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.timings = {**job.timings, **{k: round(v, 3) for k, v in timings.items()}}


def run_job(ctx: PipelineContext, job_id: int) -> None:
    """Run a claimed job; never raises."""
    try:
        _run(ctx, job_id)
    except JobInterrupted:
        log.info("job %s: interrupted by shutdown, resumes on restart", job_id)
    except (JobError, VolumeError, InferenceError, InferenceUnavailable, EncodeError) as exc:
        _fail(ctx, job_id, str(exc))
    except Exception as exc:
        log.exception("job %s: unexpected error", job_id)
        _fail(ctx, job_id, f"internal error: {type(exc).__name__}: {exc}")


def _fail(ctx: PipelineContext, job_id: int, reason: str) -> None:
    log.warning("job %s failed: %s", job_id, reason)
    _set_state(ctx.store, job_id, JobState.FAILED, error=reason, finished_at=utcnow())
    ctx.store.record("job_failed", reason, job_id=job_id)


def _run(ctx: PipelineContext, job_id: int) -> None:
    with ctx.store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        paths = s.scalars(select(Instance.path).where(Instance.series_uid == job.series_uid)).all()
        study = s.get(Study, job.study_uid)
        assert study is not None and job.started_at is not None
        waits = {
            "completion_wait_s": (job.created_at - study.last_received_at).total_seconds(),
            "queue_wait_s": (job.started_at - job.created_at).total_seconds(),
        }
    _timing(ctx.store, job_id, **waits)
    if job.action == "forward":
        _forward(ctx, job_id)
        return
    log.info(
        "job %s: series %s, %d instances, models %s",
        job_id,
        job.series_uid,
        len(paths),
        ",".join(job.models),
    )
    t0 = time.perf_counter()
    volume = build_volume(paths)
    _timing(ctx.store, job_id, volume_s=time.perf_counter() - t0)

    structures, probabilities, scores = _infer(ctx, job, volume)
    t0 = time.perf_counter()
    _save_masks(ctx.settings.jobs_dir / str(job_id), structures)
    _timing(ctx.store, job_id, masks_s=time.perf_counter() - t0)

    _set_state(ctx.store, job_id, JobState.ENCODING)
    t0 = time.perf_counter()
    found = [s for s in structures if s.mask.any()]
    absent = [s for s in structures if not s.mask.any()]
    if not found:
        # An empty result is a result: the SR says so; there is no SEG or RTSTRUCT to write.
        ctx.store.record("job_empty_result", "no structure found", job_id=job_id)
        if "SR" not in job.outputs:
            _set_state(
                ctx.store,
                job_id,
                JobState.DONE,
                finished_at=utcnow(),
                error="no structure found: nothing to encode",
            )
            return
    objects = _encode(ctx, job, volume, found, absent, probabilities, scores)
    _timing(ctx.store, job_id, encode_s=time.perf_counter() - t0)

    with ctx.store.session() as s:  # outputs and their deliveries appear together
        job = s.get(Job, job_id)
        assert job is not None
        t0 = time.perf_counter()
        for kind, ds in objects:
            archive_output(s, ctx.settings, job, kind, ds)
        job.timings = {**job.timings, "archive_s": round(time.perf_counter() - t0, 3)}
        job.state = JobState.DISPATCHING if job.destinations else JobState.DONE
        job.timings = {**job.timings, "dispatch_started_at": time.time()}
        if not job.destinations:
            job.finished_at = utcnow()
    log.info("job %s: %d objects archived", job_id, len(objects))
    ctx.on_outputs()


def _forward(ctx: PipelineContext, job_id: int) -> None:
    """Send the selected series as received: its instances become the job's outputs."""
    with ctx.store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        instances = s.scalars(
            select(Instance).where(Instance.series_uid == job.series_uid).order_by(Instance.id)
        ).all()
        for inst in instances:
            output = Output(
                job_id=job.id,
                kind="ORIGINAL",
                sop_instance_uid=inst.sop_instance_uid,
                series_uid=inst.series_uid,
                path=inst.path,
            )
            s.add(output)
            s.flush()
            add_deliveries(s, ctx.settings, job, output)
        job.state = JobState.DISPATCHING
        job.timings = {**job.timings, "dispatch_started_at": time.time()}
    log.info("job %s: forwarding %d instances", job_id, len(instances))
    ctx.on_outputs()


def _infer(
    ctx: PipelineContext, job: Job, volume: Volume
) -> tuple[
    list[Structure],
    dict[tuple[str, str], np.ndarray],
    list[tuple[Structure, float, float]],
]:
    """Run the job's models; while Triton is unavailable the job waits, visibly, and retries.

    A model that answers with an error fails the job with the server's message. A model the
    server does not load within ``triton_start_timeout_s`` (while the server itself is up)
    fails it too, rather than waiting forever.
    """
    missing = [name for name in job.models if name not in ctx.cards]
    if missing:
        raise JobError(f"no model card for {', '.join(missing)}")
    cards = [ctx.cards[name] for name in job.models]
    waiting_since: float | None = None
    attempt = 0
    while True:
        client = ctx.client().clone()  # its own connection: clients are not thread-safe
        try:
            _check_ready(client, cards)
            results = _run_models(ctx, job, volume, client, cards)
            break
        except InferenceUnavailable as exc:
            now = time.monotonic()
            if waiting_since is None:
                waiting_since = now
                log.warning("job %s: waiting for inference: %s", job.id, exc)
                _set_state(ctx.store, job.id, JobState.WAITING_INFERENCE, error=str(exc))
                ctx.store.record("job_waiting_inference", str(exc), job_id=job.id)
            server_up = client.is_ready()
            if server_up and now - waiting_since > ctx.settings.triton_start_timeout_s:
                raise InferenceError(
                    f"Triton is up but did not make it ready within "
                    f"{ctx.settings.triton_start_timeout_s:.0f} s: {exc}"
                ) from exc
            delay = min(ctx.settings.triton_retry_max_s, 0.5 * 2**attempt)
            attempt += 1
            if ctx.stopping.wait(delay):
                raise JobInterrupted() from exc
        finally:
            client.close()
    if waiting_since is not None:
        waited = time.monotonic() - waiting_since
        _set_state(ctx.store, job.id, JobState.RUNNING, error=None)
        ctx.store.record("job_inference_resumed", f"after {waited:.1f} s", job_id=job.id)
        _timing(ctx.store, job.id, waiting_inference_s=waited)
    structures: list[Structure] = []
    scores = {card.name: results[card.name].scores for card in cards if results[card.name].scores}
    if scores:  # classification models: one score per label, kept with the job and in events
        directory = ctx.settings.jobs_dir / str(job.id)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "scores.json").write_text(json.dumps(scores, indent=2))
        ctx.store.record("job_scores", json.dumps(scores), job_id=job.id)
    for card in cards:
        output = results[card.name]
        if output.labels is None:
            continue
        structures.extend(
            Structure(label, card, output.labels == label.value) for label in card.labels
        )
    probabilities = {
        (card.name, label.name): results[card.name].probabilities[label.value]
        for card in cards
        if OutputKind.PROBABILITY_MAP in card.outputs
        for label in card.labels
        if label.value in results[card.name].probabilities
    }
    if probabilities:  # kept with the job, by "model/label", like the masks
        directory = ctx.settings.jobs_dir / str(job.id)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            directory / "probabilities.npz",
            **{f"{model}/{label}": p for (model, label), p in probabilities.items()},
        )
    classified = [
        (
            Structure(label, card, np.zeros((0,), dtype=bool)),
            results[card.name].scores[label.name],
            card.postprocessing.threshold,
        )
        for card in cards
        for label in card.labels
        if label.name in results[card.name].scores
    ]
    return structures, probabilities, classified


def _check_ready(client: InferenceClient, cards: list[ModelCard]) -> None:
    if not client.is_ready():
        raise InferenceUnavailable(f"Triton at {client.url} is not ready")
    for card in cards:
        if not client.is_ready(card.triton_model):
            raise InferenceUnavailable(f"model {card.triton_model} is not ready on {client.url}")


def _run_models(
    ctx: PipelineContext,
    job: Job,
    volume: Volume,
    client: InferenceClient,
    cards: list[ModelCard],
) -> dict[str, ModelOutput]:
    """The job's models concurrently (each Triton model instance is its own process)."""

    def call(card: ModelCard) -> ModelOutput:
        own = client.clone()
        try:
            return run_model(card, volume.hu, volume.affine, client=own)
        finally:
            own.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(cards), thread_name_prefix=f"job{job.id}") as pool:
        outputs = dict(zip([c.name for c in cards], pool.map(call, cards), strict=True))
    timings = {"inference_s": time.perf_counter() - t0}
    for name, out in outputs.items():
        for key, seconds in out.timings.items():
            timings[f"{name}_{key}"] = seconds
    _timing(ctx.store, job.id, **timings)
    return outputs


def _save_masks(directory: Path, structures: list[Structure]) -> None:
    """Keep the models' raw output with the job (audit, explainability, tests), bit-packed."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {f"{s.card.name}/{s.label.name}": np.packbits(s.mask) for s in structures}
    shape = structures[0].mask.shape if structures else (0, 0, 0)
    np.savez_compressed(directory / "masks.npz", _shape=np.asarray(shape), **arrays)


def load_masks(path: Path) -> dict[str, np.ndarray]:
    """The masks a job saved, by ``model/label``, as boolean volumes."""
    with np.load(path) as data:
        shape = tuple(int(v) for v in data["_shape"])
        count = int(np.prod(shape))
        return {
            key: np.unpackbits(data[key], count=count).astype(bool).reshape(shape)
            for key in data.files
            if key != "_shape"
        }


def _encode(
    ctx: PipelineContext,
    job: Job,
    volume: Volume,
    found: list[Structure],
    absent: list[Structure],
    probabilities: dict[tuple[str, str], np.ndarray],
    classified: list[tuple[Structure, float, float]],
) -> list[tuple[str, Dataset]]:
    settings = ctx.settings
    dev = settings.device
    provenance = Provenance(
        manufacturer=dev.manufacturer,
        model_name=dev.model_name,
        software_version=dev.software_version,
        device_serial_number=dev.device_serial_number,
        institution_name=dev.institution_name,
    )
    out = settings.output_series

    def identity(kind: str) -> SeriesIdentity:
        """A new series per output kind and job; amended results say which version they are."""
        spec = out[kind]
        description = spec.description if job.version == 1 else f"{spec.description} v{job.version}"
        return SeriesIdentity(hd.UID(), spec.number, description[:64], hd.UID())

    objects: list[tuple[str, Dataset]] = []
    added = ensure_type2(volume.datasets)
    if volume.sources is not None:
        ensure_type2(volume.sources)
    # SEG and SR reference the source instances (a multi-frame image's frames in its own order).
    sources = volume.source_images
    found_in_source_order = [
        Structure(s.label, s.card, volume.in_source_order(s.mask)) for s in found
    ]
    if added:
        ctx.store.record("type2_attributes_added", ", ".join(added), job_id=job.id)
    for ds in volume.datasets:  # decode every header element now: the threads only read them
        for _ in ds:
            pass
    # The RTSTRUCT needs nothing from the SEG: it is built on a second thread meanwhile.
    rt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"job{job.id}-rt")
    rt_future = None
    if "RTSTRUCT" in job.outputs and found:
        rt_future = rt_pool.submit(
            build_rtstruct,
            source_images=volume.datasets,
            structures=found,
            provenance=provenance,
            series=identity("RTSTRUCT"),
        )
    rt_pool.shutdown(wait=False)
    seg = None
    if found:
        seg = build_seg(
            source_images=sources,
            structures=found_in_source_order,
            provenance=provenance,
            series=identity("SEG"),
            seg_type=str((job.options or {}).get("seg_type", "binary")),
        )
        if "SEG" in job.outputs or "SR" in job.outputs:
            objects.append(("SEG", seg))
    if "SR" in job.outputs:
        volumes_ml = [float(s.mask.sum()) * volume.voxel_volume_ml for s in found]
        intensities = [
            (float(v.mean()), float(v.min()), float(v.max()))
            for v in (volume.hu[s.mask] for s in found)
        ]
        device_uid = generate_uid(entropy_srcs=[settings.ae_title, dev.device_serial_number])
        sr = build_measurement_report(
            source_images=sources,
            seg=seg,
            structures=found,
            volumes_ml=volumes_ml,
            intensities_hu=intensities,
            absent=absent,
            classifications=classified,
            provenance=provenance,
            device_uid=device_uid,
            series=identity("SR"),
        )
        objects.append(("SR", sr))
    if rt_future is not None:
        objects.append(("RTSTRUCT", rt_future.result()))  # its exception, if any, is raised here
    if "PROBABILITY_MAP" in job.outputs:
        # Every structure with a probability map (found or not: a low map explains an absence).
        mapped = [s for s in (*found, *absent) if (s.card.name, s.label.name) in probabilities]
        if mapped:
            fractional = build_probability_seg(
                source_images=sources,
                structures=mapped,
                probabilities=[
                    volume.in_source_order(probabilities[(s.card.name, s.label.name)])
                    for s in mapped
                ],
                provenance=provenance,
                series=identity("PROBABILITY_MAP"),
            )
            objects.append(("PROBABILITY_MAP", fractional))
        else:
            ctx.store.record(
                "probability_map_unavailable",
                "no model of this job gives a probability map",
                job_id=job.id,
            )
    return objects
