"""One job, start to finish: volume -> Triton -> encoders -> archive and outbox.

The job layer calls the stages through their public functions, in order: ``inference`` builds
the volume and runs the models, ``encoders`` writes the objects, ``dispatch`` archives them and
queues their deliveries. A job is caught in exactly one place (:func:`run_job`): any failure
marks it failed with a reason that names the stage; the log line carries the job id and UIDs,
never PHI, and an unexpected exception's text stays in the log (it may quote a header value).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from airouter.core.db import Instance, Job, Notification, Store, Study
from airouter.core.gcpause import collection_paused
from airouter.core.phi import REGISTRY
from airouter.core.qc import QcAction, QualityChecks
from airouter.core.settings import (
    DeidentifySettings,
    EncoderSettings,
    InferenceSettings,
    MonitoringSettings,
)
from airouter.core.tags import text_value
from airouter.core.templates import Template
from airouter.core.vocab import (
    Action,
    JobState,
    Notify,
    OutputKind,
    Priority,
    Review,
    RunMode,
    SegType,
)
from airouter.jobs.artefacts import save_masks, save_probabilities, save_scores
from airouter.jobs.monitoring import EvaluationError, evaluate
from airouter.jobs.priors import PriorImages, find_prior, interval_days
from airouter.jobs.qc import check_volume
from airouter.jobs.recorder import JobCancelled, JobRecorder
from airouter.jobs.specs import (
    Templated,
    apply_template,
    classifications_of,
    looked_for_structures,
    out_of_view,
    structures_of,
)
from dispatch.deidentify import burned_in_refusal
from dispatch.outbox import Outbox
from encoders.common import Classification, EncodeError, PriorStudy, Structure
from encoders.outputs import EncodedOutputs, OutputRequest, SourceSeries, encode_outputs
from encoders.sr import InputQuality
from inference.algorithms import truncated_slices
from inference.cards import ModelCard
from inference.runner import ModelOutput, run_model
from inference.triton import InferenceClient, InferenceError, InferenceUnavailable
from inference.volume import Allocator, Volume, VolumeError, build_volume

log = logging.getLogger(__name__)


@dataclass
class PipelineContext:
    """What every job needs from the node: the store, the models, the stages' settings."""

    store: Store
    cards: dict[str, ModelCard]
    client: Callable[[], InferenceClient]  # the inference client (the server may be down)
    outbox: Outbox
    on_outputs: Callable[[], None]  # wake the dispatcher
    jobs_dir: Path
    inference: InferenceSettings
    encoders: EncoderSettings
    device_uid: str  # the SR's observer device
    templates: dict[str, Template] = field(default_factory=dict)  # site structure templates
    stopping: threading.Event = field(default_factory=threading.Event)
    owner: str | None = None  # this node's lease owner (jobs it claims carry it)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)


class JobError(Exception):
    """A job cannot proceed; the message is the reason recorded in the job."""


class JobInterrupted(Exception):
    """The node is stopping while the job waits; it is queued again and resumes on restart."""


@dataclass
class _Run:
    """One job being run: its row as claimed, its recorder, the stage it is in."""

    job: Job
    recorder: JobRecorder
    stage: str = "start"


def run_job(ctx: PipelineContext, job_id: int) -> None:
    """Run a claimed job; never raises."""
    job = _claimed(ctx.store, job_id)
    run = _Run(job, JobRecorder(ctx.store, job_id, ctx.owner, list(job.models or [])))
    try:
        try:
            _run(ctx, run)
        except JobInterrupted:
            log.info("job %s: interrupted by shutdown, queued again", job_id)
            # A clean stop is not the job's fault: the attempt is given back.
            run.recorder.transition(JobState.QUEUED, attempts=max(run.job.attempts - 1, 0))
        except (
            JobError,
            VolumeError,
            InferenceError,
            InferenceUnavailable,
            EncodeError,
            EvaluationError,
        ) as exc:
            run.recorder.fail(str(exc))
        except JobCancelled:
            raise
        except Exception as exc:
            log.exception("job %s: unexpected error in stage %s", job_id, run.stage)
            run.recorder.fail(
                f"internal error in stage {run.stage}: {type(exc).__name__} "
                f"(the node's log has the details of job {job_id})"
            )
    except JobCancelled as exc:
        log.info("job %s stops in stage %s: %s", job_id, run.stage, exc)


def offsite_refusal(job: Job, cards: dict[str, ModelCard], ds: Any) -> str | None:
    """Why ``job``'s series must not go to its off-site models (cards with ``deidentify``):
    its pixels may carry burned-in text and the rule does not allow it; None: it may."""
    offsite = [c.name for c in (cards.get(m) for m in job.models) if c and c.deidentify]
    if not offsite or (job.options or {}).get("allow_burned_in"):
        return None
    refusal = burned_in_refusal(ds, DeidentifySettings())
    return f"not sent to off-site model {', '.join(offsite)}: {refusal}" if refusal else None


def _claimed(store: Store, job_id: int) -> Job:
    with store.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} is gone")
        return job


def _run(ctx: PipelineContext, run: _Run) -> None:
    job = run.job
    with ctx.store.session() as s:
        paths = s.scalars(select(Instance.path).where(Instance.series_uid == job.series_uid)).all()
        study = s.get(Study, job.study_uid)
        assert study is not None and job.started_at is not None
        run.recorder.time(
            completion_wait_s=(job.created_at - study.last_received_at).total_seconds(),
            queue_wait_s=(job.started_at - job.created_at).total_seconds(),
        )
    if job.action is Action.FORWARD:
        _forward(ctx, run)
        return
    if job.action is Action.EVALUATE:
        run.stage = "evaluation"
        max_bytes = int(ctx.inference.max_volume_mb * 1024 * 1024)
        evaluate(ctx.store, run.recorder, job, ctx.monitoring, max_bytes)
        return
    log.info(
        "job %s: series %s, %d instances, models %s",
        job.id,
        job.series_uid,
        len(paths),
        ",".join(job.models),
    )
    # the volume is built in a kept shared-memory region that Triton reads it from (no copy
    # per model), lent for the job
    with ctx.client().buffers() as allocate:
        _analyse(ctx, run, list(paths), allocate)


def _analyse(ctx: PipelineContext, run: _Run, paths: list[str], allocate: Allocator) -> None:
    """Volume, quality checks, models, encoding and archiving of an analysis job."""
    job = run.job
    run.stage = "volume"
    t0 = time.perf_counter()
    qc_spec = (job.options or {}).get("qc")
    checks = QualityChecks.model_validate(qc_spec) if qc_spec is not None else None
    volume = build_volume(
        paths,
        int(ctx.inference.max_volume_mb * 1024 * 1024),
        drop_duplicates=checks is not None and checks.duplicate_slices,
        allocate=allocate,
    )
    REGISTRY.remember_dataset(volume.datasets[0])  # what the encoders' libraries may quote
    run.recorder.time(volume_s=time.perf_counter() - t0)
    quality = None
    if checks is not None:
        run.stage = "qc"
        t0 = time.perf_counter()
        findings = check_volume(volume, checks)
        run.recorder.time(qc_s=time.perf_counter() - t0)
        if findings:
            rejected = checks.action is QcAction.REJECT
            quality = InputQuality(rejected, tuple(f.describe() for f in findings))
            reasons = "; ".join(quality.findings)
            run.recorder.event("qc_failed" if rejected else "qc_warning", reasons)
            log.info("job %s: input quality: %s", job.id, reasons)
            if rejected:
                _reject_for_quality(ctx, run, volume, quality, checks)
                return
    refusal = offsite_refusal(job, ctx.cards, volume.datasets[0])
    if refusal is not None:  # an off-site model would see the text in the pixels
        run.recorder.fail(refusal)
        return
    run.stage = "inference"
    structures, classified = _infer(ctx, run, volume, allocate)
    structures = _chosen(run, structures)
    prior = None
    if (job.options or {}).get("prior") is not None:
        run.stage = "prior"
        prior = _measure_prior(ctx, run, volume, job.options["prior"])
    run.stage = "encoding"
    run.recorder.transition(JobState.ENCODING)
    if not any(s.found for s in structures):
        # An empty result is a result: the SR says so; there is no SEG or RTSTRUCT to write.
        run.recorder.event("job_empty_result", "no structure found")
        if OutputKind.SR not in job.outputs:
            run.recorder.transition(JobState.DONE, error="no structure found: nothing to encode")
            return
    _encode_and_archive(ctx, run, volume, structures, classified, quality, prior=prior)


@dataclass(frozen=True)
class _Prior:
    """The prior study found for a job, and what the job's models found in it."""

    found: PriorImages
    interval_days: int
    images: list[Any]
    structures: list[Structure]

    def for_template(self, template: Template | None) -> PriorStudy:
        """The prior as the SR of ``template``'s output set names its structures."""
        named = apply_template(template, self.structures).structures
        return PriorStudy(
            study_uid=self.found.study_uid or "",
            study_date=self.found.study_date or "",
            interval_days=self.interval_days,
            images=self.images,
            volumes={
                s.spec.tracking_id: float(s.volume_ml)
                for s in named
                if s.found and s.volume_ml is not None
            },
        )


def _measure_prior(
    ctx: PipelineContext, run: _Run, volume: Volume, options: dict[str, Any]
) -> _Prior | None:
    """The patient's previous study (``airouter.jobs.priors``), measured by this job's models;
    None, with the outcome recorded, when there is none to compare with."""
    t0 = time.perf_counter()
    header = volume.datasets[0]
    folder = ctx.jobs_dir / str(run.job.id) / "prior"
    found = find_prior(ctx.store, header, options, ctx.outbox.settings, folder)
    if found.outcome != "compared":
        run.recorder.event(f"prior_{found.outcome}", found.detail)
        log.info("job %s: no prior compared (%s): %s", run.job.id, found.outcome, found.detail)
        return None
    before = build_volume(found.paths, int(ctx.inference.max_volume_mb * 1024 * 1024))
    cards = [ctx.cards[name] for name in run.job.models]
    results = _wait_and_run(ctx, run, before, cards)
    structures = [
        s
        for card in cards
        for s in structures_of(card, results[card.name], before.hu, before.voxel_volume_ml)
    ]
    days = interval_days(found.study_date or "", str(header.get("StudyDate", ""))) or 0
    run.recorder.event(
        "prior_compared",
        {
            "study": found.study_uid,
            "series": found.series_uid,
            "where": found.where,
            "interval_days": days,
            "detail": found.detail,
        },
    )
    run.recorder.time(prior_s=time.perf_counter() - t0)
    return _Prior(found, days, list(before.source_images), structures)


def _reject_for_quality(
    ctx: PipelineContext,
    run: _Run,
    volume: Volume,
    quality: InputQuality,
    checks: QualityChecks,
) -> None:
    """No model runs on an input that failed its rule's checks: the job ends rejected with the
    reasons, or, when the rule asks for a report, its SR says why (every structure the models
    look for "not assessable") and goes where the results would have gone."""
    error = "input quality: " + "; ".join(quality.findings)
    if not checks.report:
        run.recorder.transition(JobState.REJECTED, error=error)
        return
    missing = [name for name in run.job.models if name not in ctx.cards]
    if missing:
        raise JobError(f"no model card for {', '.join(missing)}")
    looked_for = [s for name in run.job.models for s in looked_for_structures(ctx.cards[name])]
    run.recorder.transition(JobState.ENCODING, error=error)
    _encode_and_archive(ctx, run, volume, looked_for, [], quality, kinds=frozenset({OutputKind.SR}))


def _chosen(run: _Run, structures: list[Structure]) -> list[Structure]:
    """The structures a reviewer chose to send (``options.structures``: the job approves a
    subset of an earlier one's results), or all of them."""
    names = (run.job.options or {}).get("structures")
    if not names:
        return structures
    kept = [s for s in structures if s.spec.name in names]
    run.recorder.event("review_subset", ", ".join(s.spec.name for s in kept))
    return kept


def is_shadow(job: Job, cards: dict[str, ModelCard]) -> bool:
    """Whether the job is a shadow run: its rule says so, or one of its models'."""
    if (job.options or {}).get("mode") == RunMode.SHADOW:
        return True
    return any(c.mode is RunMode.SHADOW for n in job.models if (c := cards.get(n)) is not None)


def _note_shadow(ctx: PipelineContext, run: _Run, s: Session, job: Job) -> None:
    withheld = ctx.outbox.shadow_withheld(s, job)
    sent = [d for d in job.destinations if d not in withheld]
    run.recorder.event(
        "shadow_run",
        f"archived; sent to {', '.join(sent) or 'no destination'}"
        + (f"; not to {', '.join(withheld)} (not marked test)" if withheld else ""),
    )


def stat_finding(
    job: Job, structures: list[Structure], classified: list[Classification]
) -> str | None:
    """What a STAT job found, said at once to the receivers (before review and delivery):
    the findings its classification models call present, or, with none of those, the
    structures its models found (a STAT rule exists so that someone looks now). None: not a
    STAT job, or nothing found."""
    if job.priority < Priority.STAT.rank:
        return None
    present = [c.spec.name for c in classified if c.score >= c.threshold]
    if classified:
        return f"present: {', '.join(present)}" if present else None
    found = [s.spec.name for s in structures if s.found]
    return f"found: {', '.join(found)}" if found else None


def after_archive(job: Job) -> JobState:
    """Where a job goes once its outputs are archived: awaiting review when its rule wants
    one (and there is somewhere to send), else dispatching, or done with nowhere to send."""
    if not job.destinations:
        return JobState.DONE
    if (job.options or {}).get("review") == Review.REQUIRED:
        return JobState.AWAITING_REVIEW
    return JobState.DISPATCHING


def _forward(ctx: PipelineContext, run: _Run) -> None:
    """Send the selected series as received: its instances become the job's outputs."""
    run.stage = "forward"
    with ctx.store.session() as s:
        job = s.get(Job, run.job.id)
        assert job is not None
        if is_shadow(job, ctx.cards):
            job.options = {**(job.options or {}), "mode": RunMode.SHADOW.value}
        count = ctx.outbox.forward(s, job)
        run.recorder.time(dispatch_started_at=time.time())
        if (job.options or {}).get("mode") == RunMode.SHADOW:
            _note_shadow(ctx, run, s, job)
        run.recorder.apply(job, after_archive(job))
        run.recorder.flush_events(s, job.study_uid)
    log.info("job %s: forwarding %d instances", run.job.id, count)
    ctx.on_outputs()


def _infer(
    ctx: PipelineContext, run: _Run, volume: Volume, allocate: Allocator | None = None
) -> tuple[list[Structure], list[Classification]]:
    """Run the job's models and keep their raw output with the job (the classic models'
    labels written by the server into ``allocate``'s buffers: no copy)."""
    job = run.job
    missing = [name for name in job.models if name not in ctx.cards]
    if missing:
        raise JobError(f"no model card for {', '.join(missing)}")
    cards = [ctx.cards[name] for name in job.models]
    results = _wait_and_run(ctx, run, volume, cards, allocate)
    structures = [
        s
        for card in cards
        for s in structures_of(card, results[card.name], volume.hu, volume.voxel_volume_ml)
    ]
    classified = [c for card in cards for c in classifications_of(card, results[card.name])]
    _note_truncation(run, structures)
    t0 = time.perf_counter()
    _keep_artefacts(ctx, run, structures, results)
    run.recorder.time(masks_s=time.perf_counter() - t0)
    return structures, classified


def _targets(ctx: PipelineContext, job: Job) -> list[tuple[Template | None, list[str]]]:
    """The output sets a job writes: one per structure template among its destinations (a
    destination's own, else the rule's, else the site's), each with the destinations it goes
    to; one set, for the archive, when there is nowhere to send."""
    default = (job.options or {}).get("template") or ctx.encoders.template
    groups: dict[str | None, list[str]] = {}
    for destination in job.destinations:
        node = ctx.outbox.settings.destinations.get(destination)
        name = node.template if node is not None and node.template else default
        groups.setdefault(name, []).append(destination)
    if not groups:
        groups[default] = []
    targets = []
    for name, destinations in groups.items():
        if name is not None and name not in ctx.templates:
            raise JobError(f"no structure template {name!r} is loaded")
        targets.append((ctx.templates[name] if name is not None else None, destinations))
    return targets


def _template_note(template: Template, destinations: list[str], templated: Templated) -> str:
    note = f"{template.name} for {', '.join(destinations) or 'the archive'}"
    if templated.left_out:
        note += f"; not listed, not sent: {', '.join(templated.left_out)}"
    if templated.missing:
        note += f"; listed, from no model of this job: {', '.join(templated.missing)}"
    return note


def _note_truncation(run: _Run, structures: list[Structure]) -> None:
    """Record the structures the field of view cuts: on how many slices each touches the
    image border (a body there goes on beyond the image; its volume is a lower bound)."""
    cut = {}
    for s in structures:
        slices = truncated_slices(s.mask) if s.found else 0
        if slices:
            cut[s.spec.name] = slices
    if cut:
        total = len(structures[0].mask)
        run.recorder.event(
            "structure_truncated",
            "; ".join(
                f"{name}: the field of view cuts it on {n} of {total} slices"
                for name, n in cut.items()
            ),
        )


def _keep_artefacts(
    ctx: PipelineContext, run: _Run, structures: list[Structure], results: dict[str, ModelOutput]
) -> None:
    directory = ctx.jobs_dir / str(run.job.id)
    save_masks(directory, {_key(s): s.mask for s in structures})
    maps = {_key(s): s.probability for s in structures if s.probability is not None}
    if maps:  # kept with the job, by "model/label", like the masks
        save_probabilities(directory, maps)
    scores = {name: out.scores for name, out in results.items() if out.scores}
    if scores:  # classification models: one score per label, kept with the job and in events
        save_scores(directory, scores)
        run.recorder.event("job_scores", scores)


def _key(s: Structure) -> str:
    return f"{s.spec.algorithm_name}/{s.spec.name}"


def _wait_and_run(
    ctx: PipelineContext,
    run: _Run,
    volume: Volume,
    cards: list[ModelCard],
    allocate: Allocator | None = None,
) -> dict[str, ModelOutput]:
    """The models' outputs; while Triton is unavailable the job waits, visibly, and retries.

    A model that answers with an error fails the job with the server's message. A model the
    server does not load within ``start_timeout_s`` (while the server itself is up) fails it
    too, rather than waiting forever.
    """
    waiting_since: float | None = None
    attempt = 0
    while True:
        client = ctx.client().clone()  # its own connection: clients are not thread-safe
        try:
            _check_ready(client, cards)
            results = _run_models(run, volume, client, cards, allocate)
            break
        except InferenceUnavailable as exc:
            now = time.monotonic()
            if waiting_since is None:
                waiting_since = now
                log.warning("job %s: waiting for inference: %s", run.job.id, exc)
                run.recorder.event("job_waiting_inference", str(exc))
                run.recorder.transition(JobState.WAITING_INFERENCE, error=str(exc))
            if client.is_ready() and now - waiting_since > ctx.inference.start_timeout_s:
                raise InferenceError(
                    f"Triton is up but did not make it ready within "
                    f"{ctx.inference.start_timeout_s:.0f} s: {exc}"
                ) from exc
            delay = min(ctx.inference.retry_max_s, 0.5 * 2**attempt)
            attempt += 1
            if ctx.stopping.wait(delay):
                raise JobInterrupted() from exc
            run.recorder.transition()  # raises JobCancelled if someone cancelled the job
        finally:
            client.close()
    if waiting_since is not None:
        waited = time.monotonic() - waiting_since
        run.recorder.time(waiting_inference_s=waited)
        run.recorder.event("job_inference_resumed", f"after {waited:.1f} s")
        run.recorder.transition(JobState.RUNNING, error=None)
    return results


def _check_ready(client: InferenceClient, cards: list[ModelCard]) -> None:
    if not client.is_ready():
        raise InferenceUnavailable(f"Triton at {client.url} is not ready")
    for card in cards:
        # a model no rule in force names is not loaded (inference.load_models): a job that
        # needs one (a rerun after its rule changed) has it loaded
        if not client.is_ready(card.triton_model) and not client.load(card.triton_model):
            raise InferenceUnavailable(f"model {card.triton_model} is not ready on {client.url}")


def _run_models(
    run: _Run,
    volume: Volume,
    client: InferenceClient,
    cards: list[ModelCard],
    allocate: Allocator | None = None,
) -> dict[str, ModelOutput]:
    """The job's models concurrently (each Triton model instance is its own process), except
    that a model whose card ``uses`` another model's result in this job waits for it and gets
    it (ct-lungs takes ct-body's body instead of computing the same body again)."""
    futures: dict[str, Future[ModelOutput]] = {}
    ordered, chained = _provider_order(cards)

    def call(card: ModelCard) -> ModelOutput:
        uses = None
        if card.input.uses is not None and card.name in chained:
            uses = futures[card.input.uses.model].result().labels
        own = client.clone()
        try:
            return run_model(
                card, volume.hu, volume.affine, client=own, uses=uses, allocate=allocate
            )
        finally:
            own.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(cards), thread_name_prefix=f"job{run.job.id}") as pool:
        for card in ordered:
            futures[card.name] = pool.submit(call, card)
        outputs = {c.name: futures[c.name].result() for c in cards}
    timings = {"inference_s": time.perf_counter() - t0}
    for name, out in outputs.items():
        for key, seconds in out.timings.items():
            timings[f"{name}_{key}"] = seconds
    run.recorder.time(**timings)
    return outputs


def _provider_order(cards: list[ModelCard]) -> tuple[list[ModelCard], set[str]]:
    """The cards in an order where a model another one uses comes first, and the names of
    those that get another model's result (its ``uses`` runs in the job; never in a cycle:
    those compute it themselves)."""
    ordered: list[ModelCard] = []
    chained: set[str] = set()
    pending = list(cards)
    names = {c.name for c in cards}
    while pending:
        ready = [
            c
            for c in pending
            if c.input.uses is None
            or c.input.uses.model not in names
            or c.input.uses.model in {o.name for o in ordered}
        ]
        if not ready:  # a cycle: the rest run on their own
            ordered += pending
            break
        for card in ready:
            if card.input.uses is not None and card.input.uses.model in names:
                chained.add(card.name)
            ordered.append(card)
            pending.remove(card)
    return ordered, chained


def _encode_and_archive(
    ctx: PipelineContext,
    run: _Run,
    volume: Volume,
    structures: list[Structure],
    classified: list[Classification],
    quality: InputQuality | None = None,
    kinds: frozenset[OutputKind] | None = None,
    prior: _Prior | None = None,
) -> None:
    """The encoders build the output set (``kinds``, or the job's outputs); the outbox
    archives it and queues its deliveries, all in one transaction with the job's move to
    ``dispatching`` (or ``done``). Python's cyclic garbage collector is paused meanwhile:
    its full passes over every object the node holds took a quarter of a large output
    set's time (:mod:`airouter.core.gcpause`)."""
    with collection_paused():
        _encode_and_archive_now(ctx, run, volume, structures, classified, quality, kinds, prior)


def _encode_and_archive_now(
    ctx: PipelineContext,
    run: _Run,
    volume: Volume,
    structures: list[Structure],
    classified: list[Classification],
    quality: InputQuality | None,
    kinds: frozenset[OutputKind] | None,
    prior: _Prior | None,
) -> None:
    job = run.job
    shadow = is_shadow(job, ctx.cards)
    t0 = time.perf_counter()
    sets: list[tuple[list[str] | None, EncodedOutputs]] = []
    wanted = kinds or frozenset(OutputKind(k) for k in job.outputs)
    targets = _targets(ctx, job)
    body_part = text_value(volume.datasets[0], "BodyPartExamined") or ""
    unseen = out_of_view(ctx.cards, structures, body_part)
    if unseen:
        run.recorder.event("not_assessable", "; ".join(f"{k}: {v}" for k, v in unseen.items()))
    for template, destinations in targets:
        templated = apply_template(template, structures)
        if template is not None:
            run.recorder.event(
                "template_applied", _template_note(template, destinations, templated)
            )
        if not any(s.found for s in templated.structures) and OutputKind.SR not in wanted:
            continue  # the template sends nothing that was found
        encoded = encode_outputs(
            request=OutputRequest(
                kinds=wanted,
                quality=quality,
                out_of_view=out_of_view(ctx.cards, templated.structures, body_part),
                seg_type=job.seg_type or SegType((job.options or {}).get("seg_type", "binary")),
                version=job.version,
                shadow=shadow,
                research=template is not None and template.research,
                structure_set_label=template.structure_set.label if template else "AI",
                structure_set_name=template.structure_set.name if template else None,
                placeholders=template is not None and template.placeholders,
                prior=prior.for_template(template) if prior is not None else None,
            ),
            source=SourceSeries(volume.datasets, volume.sources, volume.in_source_order),
            structures=templated.structures,
            classifications=classified,
            settings=ctx.encoders,
            device_uid=ctx.device_uid,
        )
        # one template for every destination: the deliveries go to all of the job's
        sets.append((destinations if len(targets) > 1 else None, encoded))
    run.recorder.time(encode_s=time.perf_counter() - t0)
    for _, produced in sets:
        for kind, detail in produced.notes:
            run.recorder.event(kind, detail)
    if not any(produced.objects for _, produced in sets):
        run.recorder.transition(
            JobState.DONE, error="the structure template lists nothing this job found"
        )
        return
    run.stage = "archive"
    with ctx.store.session() as s:  # outputs and their deliveries appear together
        row = s.get(Job, job.id)
        assert row is not None
        if shadow:  # the outbox sends a shadow run's results to test destinations only
            row.options = {**(row.options or {}), "mode": RunMode.SHADOW.value}
        t0 = time.perf_counter()
        for targeted, produced in sets:
            for kind, ds in produced.objects:
                ctx.outbox.archive(s, row, kind, ds, targeted)
        run.recorder.time(archive_s=time.perf_counter() - t0, dispatch_started_at=time.time())
        if shadow:
            _note_shadow(ctx, run, s, row)
        finding = stat_finding(row, structures, classified)
        if finding is not None:
            s.add(Notification(job_id=row.id, event=Notify.STAT_FINDING, version=row.version))
            run.recorder.event("stat_finding", finding)
        run.recorder.apply(row, after_archive(row))
        run.recorder.flush_events(s, row.study_uid)
    log.info("job %s: %d objects archived", job.id, sum(len(e.objects) for _, e in sets))
    ctx.on_outputs()
