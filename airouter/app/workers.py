"""Worker processes on the node's ports, so that parallel associations and HTTP requests use
every core (one Python process is held to one by the GIL).

The node (``airouter serve --workers N``) starts N-1 worker processes. Each accepts DIMSE
associations from the node's listening socket, which it inherits (whichever process is free
first takes a connection, so associations spread by load), listens on the HTTP port too with
``SO_REUSEPORT`` (the kernel spreads new connections over the listeners), stores and
indexes what it receives exactly as the node does (durable before ``0x0000``, over DIMSE or
STOW-RS), and records the studies it is receiving in the shared
``transfers`` table under a lease of its own, so that the node's completion sees them. Its
HTTP answers are the node's: the same application on the same database, its own probe of
Triton and the same rules (reloaded from their files); a retry it accepts wakes the node's
workers and dispatch with SIGUSR1. Completion, jobs, dispatch and Triton run in the node.

A worker ends with the node: on SIGTERM, or when its parent is gone. The node restarts one
that died (at most every ``RESTART_EVERY_S`` each, so one that cannot start does not spin).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from airouter.app.metrics import scraper
from airouter.app.shared import (
    Health,
    build_ingest,
    cards_in_use,
    dimse_services,
    http_app,
    rule_check,
    shared_listener,
    site_templates,
    uvicorn_config,
)
from airouter.core import metrics
from airouter.core.db import Store
from airouter.core.leases import Identity, NodeNameInUse, heartbeat, register
from airouter.core.settings import ConfigError, Settings
from airouter.core.templates import TemplateError
from airouter.core.tracker import SharedTracker
from inference.cards import ModelCardError, load_cards
from inference.triton import InferenceClient
from router.registry import RuleSet
from router.rules import RuleError
from scp.server import start_dimse

log = logging.getLogger(__name__)

SETTINGS_ENV = "AIROUTER_WORKER_SETTINGS"
DIMSE_FD_ENV = "AIROUTER_WORKER_DIMSE_FD"  # the node's DIMSE listening socket, inherited
TLS_FD_ENV = "AIROUTER_WORKER_TLS_FD"  # its DICOM TLS listening socket, when it has one
TRITON_PID_ENV = "AIROUTER_WORKER_TRITON_PID"  # the file where the node's Triton pid is
RULES_ENV = "AIROUTER_WORKER_RULES_IN_FORCE"  # the node's copy of the rules in force
WAKE = signal.SIGUSR1  # worker -> node: a job or a delivery is due now
RESTART_EVERY_S = 5.0


@dataclass
class _Worker:
    name: str
    env: dict[str, str]
    fds: list[int]
    process: subprocess.Popen[bytes] | None = None
    started: float = field(default=0.0)


def rules_in_force(settings: Settings) -> Path:
    """Where the node keeps a copy of the rule files in force, for its workers."""
    return settings.data_dir / "rules-in-force" / settings.node_name


class Workers:
    """The node's worker processes: started, restarted when one dies, stopped with it."""

    def __init__(
        self,
        settings: Settings,
        dimse: socket.socket,
        http_port: int,
        triton_url: str,
        triton_pid_file: Path | None,
        rules: Path,
        tls: socket.socket | None = None,
    ) -> None:
        self._workers: list[_Worker] = []
        for k in range(1, settings.scp.processes):
            child = settings.model_copy(deep=True)
            child.node_name = f"{settings.node_name}-r{k}"
            child.scp.dimse_port = dimse.getsockname()[1]
            child.http.port = http_port
            child.inference.triton_url = triton_url  # the node's server, never one of its own
            env = {**os.environ, SETTINGS_ENV: child.model_dump_json()}
            env[TRITON_PID_ENV] = str(triton_pid_file or "")
            env[RULES_ENV] = str(rules)
            env[DIMSE_FD_ENV] = str(dimse.fileno())
            fds = [dimse.fileno()]
            if tls is not None and child.scp.tls is not None:
                child.scp.tls.port = tls.getsockname()[1]
                env[SETTINGS_ENV] = child.model_dump_json()
                env[TLS_FD_ENV] = str(tls.fileno())
                fds.append(tls.fileno())
            self._workers.append(_Worker(child.node_name, env, fds))
        self._stopping = False

    def start(self) -> None:
        """Start every worker process."""
        for worker in self._workers:
            self._launch(worker)

    def _launch(self, worker: _Worker) -> None:
        worker.process = subprocess.Popen(
            [sys.executable, "-m", "airouter.app.workers"], env=worker.env, pass_fds=worker.fds
        )
        worker.started = time.monotonic()
        log.info("worker %s started (pid %s)", worker.name, worker.process.pid)

    def watch(self) -> list[str]:
        """Start again the workers that died; returns their names and exit codes."""
        restarted = []
        for worker in self._workers:
            process = worker.process
            if self._stopping or process is None or process.poll() is None:
                continue
            if time.monotonic() - worker.started < RESTART_EVERY_S:
                continue
            restarted.append(f"{worker.name} (exit code {process.returncode})")
            metrics.process_gone(process.pid)  # its open associations are closed
            log.warning(
                "worker %s exited (code %s): restarting it", worker.name, process.returncode
            )
            self._launch(worker)
        return restarted

    def pids(self) -> list[int]:
        """The worker processes' pids."""
        return [w.process.pid for w in self._workers if w.process is not None]

    def stop(self) -> None:
        """SIGTERM each worker and wait for it (it finishes the C-STORE it is answering)."""
        self._stopping = True
        running = [w.process for w in self._workers if w.process and w.process.poll() is None]
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _read_pid(path: str) -> int | None:
    try:
        return int(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def run(
    settings: Settings,
    triton_pid_file: str,
    rules: Path,
    dimse: socket.socket,
    tls: socket.socket | None = None,
) -> None:
    """One worker process: DIMSE and HTTP on the shared ports until SIGTERM or the node is
    gone."""
    store = Store(settings.db_url, settings.scp.sync_index_commits)
    identity = Identity(settings.node_name, settings.jobs.lease_s)
    try:
        cards = load_cards(*settings.inference.card_dirs(settings.data_dir))
        check = rule_check(cards, settings, site_templates(cards, settings))
        ruleset = RuleSet(settings.router.rules_dir, check, in_force=rules, follow=True)
        register(store, identity)
    except (NodeNameInUse, RuleError, ModelCardError, TemplateError) as exc:
        raise ConfigError(str(exc)) from exc
    tracker = SharedTracker(store, identity)
    ingest = build_ingest(store, settings)
    s = settings.inference
    client = InferenceClient(s.triton_url, s.protocol, s.request_timeout_s)
    parent = os.getppid()
    tracker.on_release = lambda: os.kill(parent, WAKE)  # the node's completion looks now
    scp_tls = settings.scp.tls
    same_port = scp_tls is not None and scp_tls.same_port
    tls_port = None if scp_tls is None else settings.scp.dimse_port if same_port else scp_tls.port
    health = Health(
        store,
        cards,
        settings,
        lambda: client,
        lambda: settings.scp.dimse_port,
        lambda: _read_pid(triton_pid_file),
        lambda: tls_port,
        lambda: cards_in_use(settings, cards, ruleset.rules),
    )
    app = http_app(
        settings,
        store,
        health,
        ingest,
        tracker,
        ruleset,
        lambda: os.kill(parent, WAKE),
        cards,
        scraper(store, health, settings.data_dir, settings.monitoring),
    )
    dimse_server = start_dimse(
        settings.scp,
        ingest,
        tracker,
        settings.incoming_dir,
        dimse_services(store, settings),
        dimse,
        tls=settings.scp.tls if same_port else None,
    )
    tls_server = None
    if tls is not None and scp_tls is not None:  # DICOM TLS, from the node's socket
        tls_server = start_dimse(
            settings.scp,
            ingest,
            tracker,
            settings.incoming_dir,
            dimse_services(store, settings),
            tls,
            tls=settings.scp.tls,
        )
    # HTTP last: a worker that answers HTTP serves DIMSE already
    sock = shared_listener(settings.http.host, settings.http.port, settings.scp.listen_backlog)
    server = uvicorn.Server(uvicorn_config(app, settings))

    def keep_alive() -> None:
        last_beat = time.monotonic()
        while not server.should_exit:
            time.sleep(1.0)
            if os.getppid() != parent:
                log.warning("worker %s: the node is gone, stopping", identity.name)
                server.should_exit = True
                break
            try:
                ruleset.check()
                if time.monotonic() - last_beat >= identity.lease_s / 3:
                    heartbeat(store, identity)
                    last_beat = time.monotonic()
            except Exception:  # the database away a moment: try again, never stop renewing
                log.exception("worker %s: rules check or heartbeat failed", identity.name)

    threading.Thread(target=keep_alive, name="keep-alive", daemon=True).start()
    # uvicorn re-raises SIGTERM after its own shutdown: an exception, so ``finally`` runs
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        server.run(sockets=[sock])
    finally:
        server.should_exit = True
        dimse_server.shutdown()
        if tls_server is not None:
            tls_server.shutdown()
        log.info("worker %s stopped", identity.name)


def main() -> None:
    """Entry point of a worker process (started by :class:`Workers`)."""
    from airouter.app.cli import configure_logging

    settings = Settings.model_validate(json.loads(os.environ[SETTINGS_ENV]))
    configure_logging(settings)
    if os.environ.get(metrics.MULTIPROC_ENV):  # count with the node's other processes
        metrics.enable_multiprocess(Path(os.environ[metrics.MULTIPROC_ENV]), fresh=False)
    try:
        dimse = socket.socket(fileno=int(os.environ[DIMSE_FD_ENV]))
        tls = (
            socket.socket(fileno=int(os.environ[TLS_FD_ENV])) if TLS_FD_ENV in os.environ else None
        )
        run(settings, os.environ.get(TRITON_PID_ENV, ""), Path(os.environ[RULES_ENV]), dimse, tls)
    except ConfigError as exc:
        log.error("worker %s cannot start: %s", settings.node_name, exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
