"""What the node and its worker processes build alike, so that a request gets the same answer
from whichever process the kernel hands it to: the ingest, the storage commitment service,
the check of the rules, the health answer, the HTTP application and its listening socket.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn
from fastapi import FastAPI
from pynetdicom import evt

from airouter.app.accounts import AccountError, add_user, any_users
from airouter.app.web import create_app
from airouter.app.web.auth import AuthPolicy
from airouter.core.db import Store, jobs_by_state
from airouter.core.pseudonyms import Reidentifier
from airouter.core.settings import RETURN_TO_SENDER, ConfigError, DicomNode, Settings
from airouter.core.templates import Template, TemplateError, load_templates
from airouter.core.tracker import AssociationTracker
from airouter.core.vocab import ModelLoading, Role
from dispatch.commitment import STORAGE_COMMITMENT_PUSH, handle_event_report
from dispatch.senders import tls_context
from inference.cards import ModelCard
from inference.triton import InferenceClient
from router.registry import RuleSet, Validator
from router.rules import Rule, RuleError, models_in_use
from scp.ingest import Ingest
from scp.qr import ArchiveQR, MoveTarget
from scp.server import ExtraService

log = logging.getLogger(__name__)


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


def dimse_services(store: Store, settings: Settings) -> list[ExtraService]:
    """What the node's DIMSE port serves beyond C-ECHO and C-STORE: storage commitment
    reports, and query/retrieve of the archive (C-MOVE to the DICOM destinations)."""
    services = [commitment_service(store)]
    qr = settings.scp.query_retrieve
    if qr.enabled:
        targets = {
            node.ae_title: MoveTarget(
                node.ae_title,
                node.host,
                node.port,
                tls_context(node) if node.tls is not None else None,
                node.host if node.tls is not None and node.tls.verify_hostname else None,
            )
            for node in settings.dispatch.destinations.values()
            if isinstance(node, DicomNode)
        }
        archive = ArchiveQR(
            store, settings.scp.ae_title, targets, qr.allowed_calling_ae_titles, qr.max_matches
        )
        services += archive.services()
    return services


def build_ingest(store: Store, settings: Settings) -> Ingest:
    """The ingest of a node or worker process, as its settings say."""
    return Ingest(
        store,
        settings.spool_dir,
        int(settings.scp.min_free_space_mb * 1024 * 1024),
        int(settings.scp.max_inflated_mb * 1024 * 1024),
        settings.incoming_dir,
        settings.node_name,
        Reidentifier(
            store,
            [
                node.ae_title
                for node in settings.dispatch.destinations.values()
                if isinstance(node, DicomNode) and node.deidentify is not None
            ],
        ),
    )


def site_templates(cards: dict[str, ModelCard], settings: Settings) -> dict[str, Template]:
    """The site structure templates (``encoders.templates_dir``), checked against the model
    cards (an entry of a model with a card names a label it has; one of a model without a
    card is only logged: it applies to nothing here) and against the settings that name one
    (the site's default, each destination's). Raises TemplateError saying what is wrong."""
    templates = load_templates(settings.encoders.templates_dir)
    problems = []
    for template in templates.values():
        for entry in template.structures:
            card = cards.get(entry.model)
            if card is None:  # a site's template may name models this node does not serve
                log.warning(
                    "template %s: no model card for %s (its entry applies to nothing here)",
                    template.name,
                    entry.model,
                )
            elif entry.label not in {label.name for label in card.labels}:
                problems.append(
                    f"template {template.name}: model {entry.model} has no label {entry.label!r}"
                )
    named = [("encoders.template", settings.encoders.template)] + [
        (f"dispatch.destinations.{name}.template", node.template)
        for name, node in settings.dispatch.destinations.items()
    ]
    for where, name in named:
        if name is not None and name not in templates:
            problems.append(f"{where}: no template {name!r} in {settings.encoders.templates_dir}")
    if problems:
        raise TemplateError("\n".join(problems))
    return templates


def rule_check(
    cards: dict[str, ModelCard], settings: Settings, templates: dict[str, Template] | None = None
) -> Validator:
    """Rules must name models with a card, configured destinations and known templates."""
    destinations = settings.dispatch.destinations
    known = templates or {}

    def validate(rules: Sequence[Rule]) -> None:
        for rule in rules:
            if rule.template is not None and rule.template not in known:
                raise RuleError(
                    f"rule {rule.name}: no template {rule.template!r} in "
                    f"{settings.encoders.templates_dir}"
                )
            missing = [m for m in rule.models if m not in cards]
            if missing:
                raise RuleError(f"rule {rule.name}: no model card for {', '.join(missing)}")
            unknown = [
                d for d in rule.destinations if d not in destinations and d != RETURN_TO_SENDER
            ]
            if unknown:
                raise RuleError(
                    f"rule {rule.name}: destination(s) not configured: {', '.join(unknown)}"
                )
            prior = rule.compare_with_prior
            source = prior.source if prior is not None else None
            if source is not None and not isinstance(destinations.get(source), DicomNode):
                raise RuleError(
                    f"rule {rule.name}: compare_with_prior.source {source!r} is not "
                    "a configured DICOM destination"
                )

    return validate


def cards_in_use(
    settings: Settings, cards: dict[str, ModelCard], rules: Sequence[Rule]
) -> list[str]:
    """The model cards ``rules`` run (every card with ``inference.load_models: all``): the
    models that must be ready, and the only ones the node's own server loads."""
    if settings.inference.load_models is ModelLoading.ALL:
        return sorted(cards)
    return sorted(m for m in models_in_use(rules) if m in cards)


class Health:
    """What ``/api/health`` answers: DIMSE, Triton and each model ready, the models the rules
    in force run (the others are not loaded: ``inference.load_models``), jobs per state, and
    which process answered. Every process probes Triton itself (readiness is never a copy)."""

    def __init__(
        self,
        store: Store,
        cards: dict[str, ModelCard],
        settings: Settings,
        client: Callable[[], InferenceClient | None],
        dimse_port: Callable[[], int | None],
        triton_pid: Callable[[], int | None],
        tls_port: Callable[[], int | None] = lambda: None,
        in_use: Callable[[], list[str]] | None = None,
    ) -> None:
        self.store = store
        self.cards = cards
        # the cards the rules in force run (the models that must be ready); default: all
        self._in_use = in_use or (lambda: sorted(cards))
        self.ae_title = settings.scp.ae_title
        self.process = settings.node_name
        self._client = client
        self._dimse_port = dimse_port
        self._tls_port = tls_port
        self._triton_pid = triton_pid
        # Triton's HTTP client (gevent) belongs to the thread that made it: once that thread
        # has exited, a call from another fails. Every probe runs on this one thread, which
        # lives as long as the node (the web server's pool threads come and go).
        self._prober = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-probe")
        self._probe: InferenceClient | None = None

    def _readiness(self) -> tuple[bool, dict[str, bool]]:
        if self._probe is None and (client := self._client()) is not None:
            self._probe = client.clone()
        probe = self._probe
        ready = probe is not None and probe.is_ready()
        models = {
            name: probe is not None and ready and probe.is_ready(card.triton_model)
            for name, card in self.cards.items()
        }
        return ready, models

    def __call__(self) -> dict[str, Any]:
        with self.store.session() as s:
            counts = jobs_by_state(s)
        ready, models = self._prober.submit(self._readiness).result()
        return {
            "status": "ok",
            "ae_title": self.ae_title,
            "dimse_port": self._dimse_port(),
            "dimse_tls_port": self._tls_port(),
            "triton_ready": ready,
            "models_ready": models,
            "models_in_use": self._in_use(),
            "triton_pid": self._triton_pid(),
            "jobs": {state.value: n for state, n in counts.items()},
            "process": self.process,
        }


def http_app(
    settings: Settings,
    store: Store,
    health: Callable[[], dict[str, Any]],
    ingest: Ingest,
    tracker: AssociationTracker,
    ruleset: RuleSet,
    wake: Callable[[], None],
    cards: dict[str, ModelCard],
    metrics: Callable[[], bytes] | None = None,
) -> FastAPI:
    """The HTTP application of a node or worker process; ``wake`` tells the node that a job
    or a delivery is due now (a retry)."""
    http = settings.http
    policy = AuthPolicy(
        open_when_no_users=http.loopback_only,
        session_hours=http.session_hours,
        login_max_failures=http.login_max_failures,
        login_window_s=http.login_window_s,
        secure_cookies=http.tls,
    )
    return create_app(
        store,
        health,
        ingest,
        tracker,
        ruleset,
        on_retry=wake,
        on_job_queued=wake,
        log_phi=settings.log_phi,
        hosts=http.served_hosts(),
        max_request_bytes=int(http.max_request_mb * 1024 * 1024),
        body_idle_s=http.body_timeout_s,
        policy=policy,
        cards=cards,
        data_dir=settings.data_dir,
        metrics=metrics,
        monitoring=settings.monitoring,
    )


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """The HTTP server's configuration: HTTPS with the configured certificate and key.

    ``log_config=None``: uvicorn's records go through the root handlers (one format, and the
    PHI filter), not handlers of its own."""
    http = settings.http
    return uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        lifespan="off",
        ssl_certfile=str(http.cert_file) if http.cert_file else None,
        ssl_keyfile=str(http.key_file) if http.key_file else None,
    )


def refuse_open_http(settings: Settings, store: Store) -> None:
    """:class:`ConfigError` when HTTP would listen beyond loopback while no user exists (it
    would serve patient data and actions to anyone on the network), unless the settings name
    an admin to create then (``http.bootstrap_admin``)."""
    http = settings.http
    if http.bootstrap_admin and http.bootstrap_password_file and not any_users(store):
        try:
            password = http.bootstrap_password_file.read_text().strip()
            add_user(store, http.bootstrap_admin, Role.ADMIN, password)
        except (OSError, AccountError) as exc:
            raise ConfigError(f"http.bootstrap_admin: cannot create the admin: {exc}") from exc
        log.info("no user yet: admin %s created (http.bootstrap_admin)", http.bootstrap_admin)
    if not http.loopback_only and not any_users(store):
        raise ConfigError(
            f"HTTP would listen on {http.host} with no user to sign in: anyone who reaches "
            "the port could read patient data. Create a user first (airouter users add NAME "
            "--role admin), or listen on 127.0.0.1 (http.host)"
        )


def claim_port(host: str, port: int, what: str) -> None:
    """Raise :class:`ConfigError` when something already listens on ``host:port``.

    The node's processes share the HTTP port with ``SO_REUSEPORT`` (HTTP requests are short
    and many: the kernel's hashing spreads them well enough), which would as gladly share it
    with another program of the same user (a second node started on the same port): the
    kernel would split the connections between the two, and neither would say so. The first
    process binds without the option first, which fails while anyone listens there."""
    if port == 0:
        return
    family, kind, _, _, address = _address(host, port)
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise _taken(what, host, port, exc) from exc


def dimse_listener(host: str, port: int, backlog: int) -> socket.socket:
    """The DIMSE port's listening socket, made by the node and inherited by its worker
    processes, which all accept from it (see ``scp.server``): non-blocking, so that a
    process another beat to a connection goes back to waiting. Bound without
    ``SO_REUSEPORT``: a port another program holds is refused."""
    sock = _listen(host, port, backlog, reuse_port=False, what="DIMSE")
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


def shared_listener(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` that the node's other processes may open too
    (``SO_REUSEPORT``: the kernel spreads new connections over them)."""
    return _listen(host, port, backlog, reuse_port=True, what="HTTP")


def _listen(host: str, port: int, backlog: int, reuse_port: bool, what: str) -> socket.socket:
    family, kind, proto, _, address = _address(host, port)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):  # "::" serves IPv4 too, as uvicorn's own
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _taken(what, host, port, exc) from exc
    return sock


def _taken(what: str, host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError(
        f"{what} port {port} on {host or '*'} is taken ({exc.strerror}): another node or "
        "program listens there"
    )


def _address(host: str, port: int) -> Any:
    try:
        return socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host!r}: {exc.strerror}") from exc
