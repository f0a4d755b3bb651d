"""More DIMSE receiver processes on the node's port, so that parallel associations use every
core (one Python process is held to one by the GIL).

The node (``airouter serve --workers N``) starts N-1 receiver processes. Each listens on the
same DIMSE port with ``SO_REUSEPORT`` (the kernel spreads new connections over the
listeners), stores and indexes what it receives exactly as the node does (durable before
``0x0000``), and records the studies it is receiving in the shared ``transfers`` table under a
lease of its own, so that the node's completion sees them. Everything else (completion, jobs,
dispatch, HTTP, Triton) runs in the node. A receiver ends with the node: on SIGTERM, or when
its parent is gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading

from pynetdicom import evt

from airouter.core.db import Store
from airouter.core.leases import Identity, NodeNameInUse, heartbeat, register
from airouter.core.settings import ConfigError, Settings
from airouter.core.tracker import SharedTracker
from dispatch.commitment import STORAGE_COMMITMENT_PUSH, handle_event_report
from scp.ingest import Ingest
from scp.server import ExtraService, start_dimse

log = logging.getLogger(__name__)

SETTINGS_ENV = "AIROUTER_RECEIVER_SETTINGS"


def commitment_service(store: Store) -> ExtraService:
    """Storage commitment reports (N-EVENT-REPORT) from the destinations we asked: they may
    reach any process on the port."""
    return ExtraService(
        STORAGE_COMMITMENT_PUSH,
        evt.EVT_N_EVENT_REPORT,
        handle_event_report,
        [store],
        scu_role=True,
        scp_role=True,
    )


def build_ingest(store: Store, settings: Settings) -> Ingest:
    """The ingest of a node or receiver process, as its settings say."""
    return Ingest(
        store,
        settings.spool_dir,
        int(settings.scp.min_free_space_mb * 1024 * 1024),
        int(settings.scp.max_inflated_mb * 1024 * 1024),
        settings.incoming_dir,
        settings.node_name,
    )


def spawn(settings: Settings, dimse_port: int, count: int) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` receiver processes for the node's ``settings`` on ``dimse_port``."""
    children = []
    for k in range(1, count + 1):
        child = settings.model_copy(deep=True)
        child.node_name = f"{settings.node_name}-r{k}"
        child.scp.dimse_port = dimse_port
        env = {**os.environ, SETTINGS_ENV: child.model_dump_json()}
        process = subprocess.Popen([sys.executable, "-m", "airouter.app.receivers"], env=env)
        children.append(process)
        log.info("receiver %s started (pid %s)", child.node_name, process.pid)
    return children


def stop(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each receiver and wait for it (it finishes the C-STORE it is answering)."""
    for process in children:
        if process.poll() is None:
            process.terminate()
    for process in children:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def run(settings: Settings) -> None:
    """One receiver process: DIMSE on the shared port until SIGTERM or the node is gone."""
    store = Store(settings.db_url, settings.scp.sync_index_commits)
    identity = Identity(settings.node_name, settings.jobs.lease_s)
    try:
        register(store, identity)
    except NodeNameInUse as exc:
        raise ConfigError(str(exc)) from exc
    tracker = SharedTracker(store, identity)
    ingest = build_ingest(store, settings)
    server = start_dimse(
        settings.scp, ingest, tracker, settings.incoming_dir, [commitment_service(store)]
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    parent = os.getppid()
    try:
        while not stopping.wait(identity.lease_s / 3):
            if os.getppid() != parent:
                log.warning("receiver %s: the node is gone, stopping", identity.name)
                break
            heartbeat(store, identity)
    finally:
        server.shutdown()
        log.info("receiver %s stopped", identity.name)


def main() -> None:
    """Entry point of a receiver process (started by :func:`spawn`)."""
    from airouter.app.cli import configure_logging

    settings = Settings.model_validate(json.loads(os.environ[SETTINGS_ENV]))
    configure_logging(settings)
    run(settings)


if __name__ == "__main__":
    main()
