"""The node: DIMSE AE, HTTP server, scheduler, job workers and the local Triton, and the
worker processes that share its DIMSE and HTTP ports (``airouter.app.workers``).

The composition root: it builds each stage from its own settings sub-tree, binds them together
(completion routes through the router, the receiver answers storage commitment reports for the
outbox) and runs them. Every stage talks through the state store, so a crash at any point
resumes on restart: jobs caught mid-run are queued again (or failed, when they were in flight
at too many crashes), pending deliveries are retried, quiet studies complete.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from airouter.app import workers
from airouter.app.metrics import scraper
from airouter.app.shared import (
    Health,
    build_ingest,
    cards_in_use,
    claim_port,
    dimse_listener,
    dimse_services,
    http_app,
    refuse_open_http,
    rule_check,
    shared_listener,
    site_templates,
    uvicorn_config,
)
from airouter.core import metrics
from airouter.core.db import Event, Store, Study, utcnow
from airouter.core.leases import (
    Identity,
    NodeNameInUse,
    heartbeat,
    others_alive,
    register,
    release_deliveries,
    release_transfers,
)
from airouter.core.settings import ConfigError, Settings
from airouter.core.templates import TemplateError
from airouter.core.tracker import SharedTracker
from airouter.core.vocab import ModelLoading, SharedMemoryMode, StudyState
from airouter.jobs.lifecycle import recover_jobs
from airouter.jobs.monitoring import queue_evaluations
from airouter.jobs.pipeline import PipelineContext, run_job
from dispatch.notify import Notifier
from dispatch.outbox import Dispatcher, Outbox
from inference.cards import InputKind, ModelCardError, load_cards
from inference.runner import warm_up
from inference.triton import MODEL_REPOSITORY, InferenceClient, LocalTriton, is_local
from router.completion import CompletionMonitor, CompletionPolicy
from router.queue import claim_next_job, required_series_ready, route_study
from router.registry import RuleSet
from router.rules import Rule, RuleError
from router.schedule import OffHours
from scp.server import start_dimse

log = logging.getLogger(__name__)

SPOOL_MARK = "spool"  # every index commit before it is on disk (see Store.mark_durable)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


class Node:
    """The whole node: builds the stages from the settings tree and runs them together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        for directory in (
            settings.data_dir,
            settings.spool_dir,
            settings.archive_dir,
            settings.jobs_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True)
        try:
            self.cards = load_cards(*settings.inference.card_dirs(settings.data_dir))
            self.templates = site_templates(self.cards, settings)
            self.ruleset = RuleSet(
                settings.router.rules_dir,
                rule_check(self.cards, settings, self.templates),
                in_force=workers.rules_in_force(settings),
            )
            self.off_hours = OffHours.parse(
                settings.router.off_hours_start, settings.router.off_hours_end
            )
        except (RuleError, ModelCardError, TemplateError) as exc:
            raise ConfigError(str(exc)) from exc
        self.store = Store(settings.db_url, settings.scp.sync_index_commits)
        self.identity = Identity(settings.node_name, settings.jobs.lease_s)
        self.tracker = SharedTracker(self.store, self.identity)
        self.ingest = build_ingest(self.store, settings)
        self.outbox = Outbox(settings.archive_dir, settings.dispatch)
        self.dispatcher = Dispatcher(self.store, settings.dispatch, self.identity)
        self.notifier = Notifier(self.store, settings.dispatch, self.identity)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.tracker.on_release = self.wake_completion
        self.triton: LocalTriton | None = None
        self._client: InferenceClient | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._woken = threading.Event()  # SIGUSR1 from a worker process (see _waker)
        self._workers: list[threading.Thread] = []
        self.dimse: Any = None
        self.dimse_tls: Any = None
        self._dimse_socket: socket.socket | None = None
        self._tls_socket: socket.socket | None = None
        self.processes: workers.Workers | None = None
        self.health = Health(
            self.store,
            self.cards,
            settings,
            lambda: self._client,
            lambda: self.dimse.server_address[1] if self.dimse else None,
            lambda: self.triton.process.pid if self.triton and self.triton.process else None,
            self._tls_port,
            self.cards_in_use,
        )

    def _tls_port(self) -> int | None:
        """The port DICOM TLS is served on (the DIMSE port itself with ``same_port``)."""
        tls = self.settings.scp.tls
        if tls is not None and tls.same_port and self.dimse is not None:
            return int(self.dimse.server_address[1])
        return int(self.dimse_tls.server_address[1]) if self.dimse_tls else None

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules in force (reloaded when their files change)."""
        return self.ruleset.rules

    def _reload_rules(self) -> None:
        if self.ruleset.check():
            detail = self.ruleset.error or "reloaded"
            self.store.record("rules_rejected" if self.ruleset.error else "rules_reloaded", detail)
            if not self.ruleset.error:
                self._load_in_use()

    def cards_in_use(self) -> list[str]:
        """The model cards the rules in force run (every card with ``inference.load_models:
        all``): the models that must be ready."""
        return cards_in_use(self.settings, self.cards, self.rules)

    def _triton_models(self) -> list[str]:
        return sorted({self.cards[name].triton_model for name in self.cards_in_use()})

    def _load_in_use(self) -> None:
        """Have the server load the models the rules in force name that it has not loaded
        (a reloaded rule may name a model no rule named), in the background: a job that
        needs one meanwhile waits for it. The local server loads the same after a restart."""
        wanted = self._triton_models()
        if self.triton is not None and self.triton.models is not None:
            self.triton.models = wanted
        if any(self.cards[name].input.kind is InputKind.TENSOR for name in self.cards_in_use()):
            threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
        client = self._client
        if client is None:
            return

        def load() -> None:
            probe = client.clone()  # made on this thread: the HTTP client is the thread's
            try:
                for model in wanted:
                    probe.load(model)
            finally:
                probe.close()

        threading.Thread(target=load, name="load-models", daemon=True).start()

    # -- inference -------------------------------------------------------------------------
    def _start_triton(self) -> None:
        s = self.settings.inference
        if s.triton_url == "local":
            imported = s.imported_models(self.settings.data_dir) / "repository"
            self.triton = LocalTriton(
                self.settings.data_dir / "triton" / self.settings.node_name,
                s.http_port,
                s.grpc_port,
                model_repositories=[MODEL_REPOSITORY, imported],
                models=None if s.load_models is ModelLoading.ALL else self._triton_models(),
            )
            self.triton.start()
            url = self.triton.url(s.protocol)
        else:
            url = s.triton_url
        shm = s.shared_memory is SharedMemoryMode.ON or (
            s.shared_memory is SharedMemoryMode.AUTO and is_local(url)
        )
        self._client = InferenceClient(url, s.protocol, s.request_timeout_s, shared_memory=shm)
        log.info("inference: %s over %s%s", url, s.protocol.value, " + shared memory" * shm)

    def client(self) -> InferenceClient:
        """The inference client (jobs check readiness and wait while the server is down)."""
        assert self._client is not None
        return self._client

    def _watch_triton(self) -> None:
        """Restart the local tritonserver if it died (jobs wait meanwhile)."""
        if self.triton is None or self._stop.is_set() or self.triton.alive():
            return
        code = self.triton.process.returncode if self.triton.process else None
        log.warning("tritonserver exited (code %s): restarting it", code)
        self.store.record("triton_restarted", f"exit code {code}")
        self.triton.start()

    def _free_idle_regions(self) -> None:
        """Free the shared-memory regions no job has used for ``shared_memory_keep_s``."""
        if self._client is not None:
            self._client.close_idle(self.settings.inference.shared_memory_keep_s)

    # -- routing and work ------------------------------------------------------------------
    def _route(self, session: Session, study_uid: str) -> None:
        route_study(session, study_uid, self.rules, self.off_hours)
        if self.settings.monitoring.enabled:  # a structure set sent back: compare it
            queue_evaluations(session, study_uid)

    def _complete_studies(self, monitor: CompletionMonitor) -> None:
        """Completion check; workers are woken once the new jobs are committed."""
        if monitor.check():
            self._wake.set()

    def wake_workers(self) -> None:
        """A job was queued outside completion (a retry): workers look now."""
        self._wake.set()

    def _worker(self, ctx: PipelineContext) -> None:
        while not self._stop.is_set():
            job_id = claim_next_job(self.store, self.identity.owner, self.identity.until())
            if job_id is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            run_job(ctx, job_id)

    def _run_now(self, job_id: str) -> None:
        """The scheduler's job ``job_id`` runs now rather than at its next tick."""
        job = self.scheduler.get_job(job_id)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    def wake_completion(self) -> None:
        """A sender released its association: completion looks now rather than at its next
        poll (a rule that completes on release routes the study at once)."""
        self._run_now("completion")

    def wake_dispatch(self) -> None:
        """New outputs: dispatch now rather than at the next tick."""
        self.dispatcher.request()
        self._run_now("dispatch")

    def _recover(self) -> None:
        """After a restart: jobs interrupted mid-run are queued again (or failed, when they
        were in flight at ``jobs.max_attempts`` crashes), and studies that were still
        receiving are marked interrupted: a crash is not the end of a transfer, so the quiet
        period no longer completes them (no job runs on a partial series); their announced
        counts, required series, a resend (after ``restart_grace_s``) or the deadline do.

        With other live nodes on the database, only the studies this node's previous run was
        receiving are interrupted (the others are theirs)."""
        try:
            previous = register(self.store, self.identity)
        except NodeNameInUse as exc:
            raise ConfigError(str(exc)) from exc
        # index rows a power loss may have taken (commits after the last durability mark)
        mark = self.store.durable_mark(SPOOL_MARK)
        self.ingest.reconcile(mark - timedelta(seconds=60) if mark is not None else None)
        self.store.mark_durable(SPOOL_MARK)
        cut = release_transfers(self.store, previous)
        if not others_alive(self.store, self.identity):
            with self.store.session() as s:  # alone: every receiving study may be partial
                receiving = select(Study.study_uid).where(Study.state == StudyState.RECEIVING)
                cut = sorted({*cut, *s.scalars(receiving)})
        self._interrupt(cut)
        recover_jobs(self.store, self.settings.jobs.max_attempts, previous)
        release_deliveries(self.store, previous)

    def _interrupt(self, studies: list[str]) -> None:
        """Hold studies whose receiving node stopped mid-transfer (see :meth:`_recover`)."""
        if not studies:
            return
        now = utcnow()
        grace_until = now + timedelta(seconds=self.settings.router.restart_grace_s)
        with self.store.session() as s:
            held = s.scalars(
                update(Study)
                .where(Study.study_uid.in_(studies), Study.state == StudyState.RECEIVING)
                .values(last_received_at=grace_until, interrupted_at=now)
                .returning(Study.study_uid)
            ).all()
            for uid in held:
                s.add(
                    Event(
                        kind="study_interrupted",
                        study_uid=uid,
                        detail="still receiving when its node stopped: completes at its "
                        "announced counts, its rules' required series, a resend or the deadline",
                    )
                )
        log.info("%d studies cut off by a stopped node are held", len(held))

    def _heartbeat(self) -> None:
        """Renew this node's leases, and take over the work of nodes whose leases expired."""
        heartbeat(self.store, self.identity)
        self.store.mark_durable(SPOOL_MARK)
        self._interrupt(release_transfers(self.store))
        recover_jobs(self.store, self.settings.jobs.max_attempts)
        if release_deliveries(self.store):
            self.wake_dispatch()
        self._wake.set()

    # -- life cycle ------------------------------------------------------------------------
    def _start_dimse(self) -> None:
        # Storage commitment reports come from the destinations we asked (they act as the
        # SCP of the SOP class on an association they start: role selection).
        services = dimse_services(self.store, self.settings)
        s = self.settings.scp
        self._dimse_socket = dimse_listener(s.dimse_host, s.dimse_port, s.listen_backlog)
        self.dimse = start_dimse(
            s,
            self.ingest,
            self.tracker,
            self.settings.incoming_dir,
            services,
            self._dimse_socket,
            tls=s.tls if s.tls is not None and s.tls.same_port else None,
        )
        if s.tls is not None and not s.tls.same_port:  # a TLS port of its own, shared too
            self._tls_socket = dimse_listener(s.dimse_host, s.tls.port, s.listen_backlog)
            self.dimse_tls = start_dimse(
                s,
                self.ingest,
                self.tracker,
                self.settings.incoming_dir,
                services,
                self._tls_socket,
                tls=s.tls,
            )

    def _schedule(self) -> None:
        r = self.settings.router
        policy = CompletionPolicy(r.quiet_period_s, r.study_deadline_s, r.deadline_action)
        monitor = CompletionMonitor(
            self.store,
            self.tracker,
            policy,
            self._route,
            lambda session, uid: required_series_ready(session, uid, self.rules),
        )
        every = {"max_instances": 1, "coalesce": True}
        self.scheduler.add_job(
            self._complete_studies,
            "interval",
            args=[monitor],
            seconds=r.completion_poll_s,
            id="completion",
            **every,
        )
        self.scheduler.add_job(
            self.dispatcher.run_due,
            "interval",
            seconds=min(self.settings.dispatch.backoff_s, 5.0),
            id="dispatch",
            **every,
        )
        self.scheduler.add_job(
            self.notifier.run_due,
            "interval",
            seconds=min(self.settings.dispatch.backoff_s, 2.0),
            id="notify",
            **every,
        )
        self.scheduler.add_job(
            self._heartbeat, "interval", seconds=self.identity.lease_s / 3, id="leases", **every
        )
        self.scheduler.add_job(self._watch_triton, "interval", seconds=2.0, id="triton", **every)
        self.scheduler.add_job(
            self._free_idle_regions, "interval", seconds=5.0, id="regions", **every
        )
        self.scheduler.add_job(self._watch_workers, "interval", seconds=2.0, id="workers", **every)
        self.scheduler.add_job(self._reload_rules, "interval", seconds=1.0, id="rules", **every)
        self.scheduler.start()

    def _pipeline(self) -> PipelineContext:
        s = self.settings
        return PipelineContext(
            store=self.store,
            cards=self.cards,
            client=self.client,
            outbox=self.outbox,
            on_outputs=self.wake_dispatch,
            jobs_dir=s.jobs_dir,
            inference=s.inference,
            encoders=s.encoders,
            templates=self.templates,
            device_uid=generate_uid(
                entropy_srcs=[s.scp.ae_title, s.encoders.device.device_serial_number]
            ),
            stopping=self._stop,
            owner=self.identity.owner,
            monitoring=s.monitoring,
        )

    def _watch_workers(self) -> None:
        """Start again a worker process that died (its connections in flight are lost to
        their senders, who see the association or request fail and send again)."""
        if self.processes is None or self._stop.is_set():
            return
        for restarted in self.processes.watch():
            self.store.record("worker_restarted", restarted)

    def _on_wake_signal(self, _signum: int, _frame: Any) -> None:
        self._woken.set()  # only that: a signal handler may interrupt any code of this thread

    def _waker(self) -> None:
        """Wake completion, the job workers and dispatch when a worker process asks."""
        while True:
            self._woken.wait()
            if self._stop.is_set():
                return
            self._woken.clear()
            self._wake_all()

    def _wake_all(self) -> None:
        """A worker process asks (a retry was queued, or a sender released an association it
        served): completion, the job workers and dispatch look now."""
        self.wake_completion()
        self.wake_workers()
        self.wake_dispatch()

    def start(self, http_port: int) -> None:
        """Recover, then start Triton, DIMSE, the worker processes (which serve HTTP on
        ``http_port`` with the node), the scheduler and the job workers (not the node's own
        HTTP server)."""
        self._recover()
        self._start_triton()
        self._start_dimse()
        if self.settings.scp.processes > 1:
            assert self._client is not None and self._dimse_socket is not None
            self.processes = workers.Workers(
                self.settings,
                self._dimse_socket,
                http_port,
                self._client.url,
                self.triton.pid_path if self.triton else None,
                workers.rules_in_force(self.settings),
                self._tls_socket,
            )
            self.processes.start()
        self._schedule()
        if self.triton is None:  # a remote server in explicit model control mode
            self._load_in_use()
        elif any(self.cards[n].input.kind is InputKind.TENSOR for n in self.cards_in_use()):
            threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
        ctx = self._pipeline()
        for n in range(self.settings.jobs.workers):
            t = threading.Thread(target=self._worker, args=(ctx,), name=f"worker-{n}", daemon=True)
            t.start()
            self._workers.append(t)

    def serve_forever(self) -> None:
        """Run the HTTP server in the foreground until Ctrl-C / SIGTERM, then stop everything."""
        refuse_open_http(self.settings, self.store)
        # every process of the node counts into files of this folder (the scrape sums them)
        metrics.enable_multiprocess(
            self.settings.data_dir / "metrics" / self.settings.node_name, fresh=True
        )
        app = http_app(
            self.settings,
            self.store,
            self.health,
            self.ingest,
            self.tracker,
            self.ruleset,
            self._wake_all,
            self.cards,
            scraper(self.store, self.health, self.settings.data_dir, self.settings.monitoring),
        )
        http = self.settings.http
        config = uvicorn_config(app, self.settings)
        # uvicorn re-raises SIGTERM after its own shutdown; make that an exception so the
        # ``finally`` below stops DIMSE, the workers and Triton.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        signal.signal(workers.WAKE, self._on_wake_signal)
        threading.Thread(target=self._waker, name="waker", daemon=True).start()
        claim_port(http.host, http.port, "HTTP")
        sock = shared_listener(http.host, http.port, self.settings.scp.listen_backlog)
        try:
            self.start(sock.getsockname()[1])
            scheme = "https" if http.tls else "http"
            log.info("HTTP on %s://%s:%s", scheme, http.host, sock.getsockname()[1])
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            self.stop()
            sock.close()

    def stop(self) -> None:
        """Stop DIMSE, the scheduler, the workers and the local Triton."""
        self._stop.set()
        self._wake.set()
        self._woken.set()
        if self.processes is not None:
            self.processes.stop()
        if self.dimse is not None:
            self.dimse.shutdown()
        if self.dimse_tls is not None:
            self.dimse_tls.shutdown()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        for t in self._workers:
            t.join(timeout=5)
        if self._client is not None:
            self._client.close()
        if self.triton is not None:
            self.triton.stop()
        log.info("node stopped")
