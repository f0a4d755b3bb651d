"""One typed settings tree for the node.

Sources, highest precedence first: command-line flags (passed as keyword arguments),
environment variables (``AIROUTER_...``, nested keys joined by ``__``), the YAML file named by
``AIROUTER_CONFIG`` or ``--config``, then the defaults embedded here (which
``config/airouter.yaml`` documents). Invalid configuration stops start-up with a message that
names the key and the source.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import socket
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from airouter.core.vocab import (
    DeadlineAction,
    ModelLoading,
    Notify,
    OutputKind,
    SharedMemoryMode,
    TritonProtocol,
)

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: default repertoire, no '\'


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"not a valid AE title: {value!r} (1-16 characters, no backslash)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Strict):
    """DICOM TLS (PS3.15 B.1, the "secure transport connection profile") for a C-STORE
    destination: the server is verified against ``ca_file``; ``cert_file``/``key_file`` give
    our certificate when the peer asks for one."""

    ca_file: Path | None = None  # None: the system's trusted CAs
    cert_file: Path | None = None
    key_file: Path | None = None
    verify_hostname: bool = True


class DeidentifySettings(_Strict):
    """A destination outside the hospital: what it gets is a copy de-identified per PS3.15
    E.1 (the Basic Application Level Confidentiality Profile, by dicognito: names, IDs,
    addresses, institution replaced; UIDs replaced consistently, the pairs kept in the
    database; private attributes removed), with the options the site chooses."""

    # Retain Longitudinal Temporal Information with Modified Dates: dates shifted by an offset
    # fixed per patient; otherwise dates and times are emptied.
    retain_longitudinal_dates: bool = True
    # Retain Device Identity: station name, device serial number and the like kept.
    retain_device_identity: bool = False
    # A series whose Burned In Annotation is YES, or unknown for a modality that burns in
    # (US, SC, XA, ES ...), is refused unless this is true.
    allow_burned_in: bool = False
    # The secret that makes the pseudonyms (the same original, the same pseudonym).
    seed: str = Field(default="airouter", min_length=1)


class DicomNode(_Strict):
    """A remote DICOM application entity we send to by C-STORE (PACS, TPS)."""

    kind: Literal["dicom"] = "dicom"
    test: bool = False  # a test system: shadow runs send to it (clinical ones too)
    template: str | None = None  # site structure template of what is sent here
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TlsSettings | None = None
    # Ask the destination to commit to keeping what we sent (Storage Commitment Push Model,
    # N-ACTION); its N-EVENT-REPORT comes back to our AE (the destination must know it).
    storage_commitment: bool = False
    # Off-site (an external AI service): it gets de-identified copies; what it sends back is
    # re-identified on arrival (airouter.core.pseudonyms).
    deidentify: DeidentifySettings | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class DicomWebNode(_Strict):
    """A DICOMweb server we send to by STOW-RS (``url`` is the service root)."""

    kind: Literal["dicomweb"]
    test: bool = False  # a test system: shadow runs send to it
    deidentify: DeidentifySettings | None = None  # off-site: see DicomNode
    template: str | None = None  # site structure template of what is sent here
    url: str = Field(pattern=r"^https?://")
    token: str | None = None  # bearer token (AIROUTER_DESTINATIONS__<NAME>__TOKEN)
    username: str | None = None  # basic authentication
    password: str | None = None
    ca_file: Path | None = None
    timeout_s: float = Field(default=60.0, gt=0)


class OrthancNode(_Strict):
    """An Orthanc server we upload to through its REST API (orthanc-api-client)."""

    kind: Literal["orthanc"]
    test: bool = False  # a test system: shadow runs send to it
    deidentify: DeidentifySettings | None = None  # off-site: see DicomNode
    template: str | None = None  # site structure template of what is sent here
    url: str = Field(pattern=r"^https?://")
    username: str | None = None
    password: str | None = None


class FolderNode(_Strict):
    """A folder we write to (``<path>/<study>/<series>/<sop>.dcm``, durable before "sent")."""

    kind: Literal["folder"]
    test: bool = False  # a test system: shadow runs send to it
    deidentify: DeidentifySettings | None = None  # off-site: see DicomNode
    template: str | None = None  # site structure template of what is sent here
    path: Path


def _destination_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "dicom"))
    return str(getattr(value, "kind", "dicom"))


Destination = Annotated[
    Annotated[DicomNode, Tag("dicom")]
    | Annotated[DicomWebNode, Tag("dicomweb")]
    | Annotated[OrthancNode, Tag("orthanc")]
    | Annotated[FolderNode, Tag("folder")],
    Discriminator(_destination_kind),
]
# A rule's destination that means "the AE that sent the study", looked up among the
# configured DICOM destinations by its AE title.
RETURN_TO_SENDER = "@sender"


_ALL_NOTIFY = list(Notify)
_CLINICAL_NOTIFY = [Notify.DONE, Notify.AWAITING_REVIEW, Notify.STAT_FINDING]


class WebhookReceiver(_Strict):
    """An HTTP endpoint told about jobs: a JSON POST signed with HMAC-SHA256 of
    ``<timestamp>.<body>`` under ``secret`` (headers ``X-Airouter-Signature: sha256=<hex>``,
    ``X-Airouter-Timestamp``, ``X-Airouter-Event``, ``X-Airouter-Delivery``: the same on a
    retry, so the receiver can drop a repeat)."""

    kind: Literal["webhook"] = "webhook"
    test: bool = False  # a test system: told about shadow runs too (only those are)
    url: str = Field(pattern=r"^https?://")
    secret: str = Field(min_length=16)  # AIROUTER_DISPATCH__RECEIVERS__<NAME>__SECRET
    events: list[Notify] = Field(default_factory=lambda: list(_ALL_NOTIFY))
    # Patient ID and accession number in the body (UIDs, states and measurements always).
    phi: bool = False
    ca_file: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0)


class FhirReceiver(_Strict):
    """A FHIR server (R4) told about results: a transaction Bundle of a DiagnosticReport with
    one Observation per measurement, referencing the ImagingStudy by its Study Instance UID
    (conditional create on the report's identifier: a retry creates nothing twice)."""

    kind: Literal["fhir"]
    test: bool = False  # a test system: told about shadow runs too (only those are)
    url: str = Field(pattern=r"^https?://")  # the FHIR base
    events: list[Notify] = Field(default_factory=lambda: list(_CLINICAL_NOTIFY))
    token: str | None = None  # bearer token
    username: str | None = None
    password: str | None = None
    # The identifier system of Patient IDs without an Issuer of Patient ID.
    patient_id_system: str = "urn:airouter:patient-id"
    ca_file: Path | None = None
    timeout_s: float = Field(default=30.0, gt=0)


Receiver = Annotated[
    Annotated[WebhookReceiver, Tag("webhook")] | Annotated[FhirReceiver, Tag("fhir")],
    Discriminator(lambda v: v.get("kind", "webhook") if isinstance(v, dict) else v.kind),
]


class DeviceSettings(_Strict):
    """Provenance written into every object the node creates (General Equipment module)."""

    manufacturer: str = "airouter project"
    model_name: str = "airouter"
    software_version: str = "0.1.0"
    device_serial_number: str = "0"
    institution_name: str | None = None


class OutputSeries(_Strict):
    """Series number and description of one kind of output (stable, not random)."""

    number: int = Field(ge=1, le=2**31 - 1)
    description: str = Field(max_length=64)


def default_output_series() -> dict[OutputKind, OutputSeries]:
    """Series number and description of each kind of output, unless configured."""
    return {
        OutputKind.SEG: OutputSeries(number=901, description="AI segmentation"),
        OutputKind.SR: OutputSeries(number=902, description="AI measurements"),
        OutputKind.RTSTRUCT: OutputSeries(number=903, description="AI structures"),
        OutputKind.PROBABILITY_MAP: OutputSeries(number=904, description="AI probability map"),
    }


class DimseTimeouts(_Strict):
    """pynetdicom's timeouts, in seconds (``None`` waits forever), for one direction."""

    acse_timeout_s: float | None = 30.0
    dimse_timeout_s: float | None = 60.0
    network_timeout_s: float | None = 60.0


class ScpTlsSettings(_Strict):
    """DICOM TLS on a port of its own (PS3.15 B.1, BCP 195: TLS 1.2 or later): the node's
    certificate and key (PEM); with ``ca_file``, a client must present a certificate that CA
    signed, or its connection is refused at the handshake."""

    port: int = Field(default=2762, ge=0, le=65535)  # 2762: DICOM over TLS (IANA); 0: any
    # true: the DIMSE port itself speaks TLS (clear-text DICOM is refused there), no second
    # port (``port`` is not used).
    same_port: bool = False
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None  # None: no client certificate asked for
    handshake_timeout_s: float = Field(default=10.0, gt=0)


class QueryRetrieveSettings(_Strict):
    """DIMSE query/retrieve of the archive (C-FIND, C-MOVE, C-GET; scp/qr.py)."""

    enabled: bool = True
    # Who may query and retrieve, by calling AE title (empty: every AE the port accepts).
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    max_matches: int = Field(default=10000, ge=1)  # answers to one C-FIND, at most

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _ae_list(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]


class ScpSettings(_Strict):
    """The receivers: DIMSE (C-ECHO, C-STORE, storage commitment reports) and STOW-RS."""

    ae_title: str = "AIROUTER"
    dimse_host: str = "0.0.0.0"
    dimse_port: int = Field(default=11112, ge=0, le=65535)
    max_associations: int = Field(default=16, ge=1)  # per process
    # Processes sharing the DIMSE and HTTP ports: parallel associations and
    # HTTP requests use that many cores (`airouter serve --workers N`; default: one per
    # core, each about 150 MB); the node itself is the first.
    processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    # native: associations that propose only Verification and storage are served by the
    # node's own DIMSE acceptor (scp/native.py: blocking reads, no polling threads);
    # pynetdicom serves the rest (storage commitment, TLS). pynetdicom: it serves all.
    receiver: Literal["native", "pynetdicom"] = "native"
    # Access control, off by default: empty lists allow everyone.
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)  # else A-ASSOCIATE-RJ
    allowed_source_networks: list[str] = Field(default_factory=list)  # CIDR; else TCP closed
    check_called_ae_title: bool = False  # reject associations not addressed to ae_title
    timeouts: DimseTimeouts = Field(default_factory=DimseTimeouts)
    # The Maximum Length we announce for a PDU (PS3.8 D.1; 0: none announced, and a PDU over
    # 64 MB is still refused); a peer's PDU longer than it is refused at its header.
    maximum_pdu_size: int = Field(default=1 << 20, ge=0)
    # Once a PDU has begun, all of it must arrive within this; once a DIMSE message (one
    # instance) has begun, all of it within message_deadline_s; a silent association ends
    # after timeouts.network_timeout_s.
    pdu_deadline_s: float = Field(default=10.0, gt=0)
    message_deadline_s: float = Field(default=600.0, gt=0)
    # One address may hold at most this many associations (more: A-ASSOCIATE-RJ, transient),
    # counted per process, as max_associations is.
    max_associations_per_source: int = Field(default=8, ge=1)
    # A connection must send its whole A-ASSOCIATE-RQ within this; until then it takes no
    # association slot, and only so many connections wait (of one address, in all).
    association_deadline_s: float = Field(default=5.0, gt=0)
    max_pending_per_source: int = Field(default=16, ge=1)
    max_pending: int = Field(default=256, ge=1)
    listen_backlog: int = Field(default=128, ge=1)
    # false: an index commit does not wait for an fsync of its own (the spool file and its
    # folder already had theirs); a durability mark every jobs.lease_s / 3 covers every commit
    # before it, and at start the index rows a power loss took are rebuilt from the spool.
    # true: each commit is fsynced before the C-STORE success, as well.
    sync_index_commits: bool = False
    # Refuse new instances (0xA700) while the data directory's filesystem has less free space.
    min_free_space_mb: float = Field(default=256.0, ge=0)
    # A deflated data set that inflates beyond this is refused (0xA700): no decompression bomb.
    max_inflated_mb: float = Field(default=1024.0, gt=0)
    # DICOM TLS on a second port (pynetdicom), shared by the node's processes as the first is.
    tls: ScpTlsSettings | None = None
    # C-FIND / C-MOVE / C-GET of the archive; C-MOVE sends to dispatch.destinations of kind
    # dicom, by their AE title.
    query_retrieve: QueryRetrieveSettings = Field(default_factory=QueryRetrieveSettings)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _ae_list(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]

    @field_validator("allowed_source_networks")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_network(value, strict=False)  # raises ValueError naming the value
        return values


class HttpSettings(_Strict):
    """The HTTP server: DICOMweb of the archive (QIDO-RS, WADO-RS, STOW-RS) and the REST API."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Names and addresses clients may reach us by (the Host header), besides the loopback
    # ones and ``host`` itself; others get 400, so a DNS-rebinding page cannot read the
    # archive. "*" answers any Host (behind a proxy that checks it).
    allowed_hosts: list[str] = Field(default_factory=list)
    # A request body (a STOW-RS request, all its parts) larger than this is refused with 413.
    max_request_mb: float = Field(default=1024.0, gt=0)
    # A request body of which nothing arrives for this long is refused with 408.
    body_timeout_s: float = Field(default=30.0, gt=0)
    # HTTPS: the server's certificate (PEM, the chain after it) and key; both or neither.
    cert_file: Path | None = None
    key_file: Path | None = None
    # Users (``airouter users add``): a dashboard session lasts this long; this many failed
    # logins in login_window_s for one user name or address, and logins are refused (429).
    session_hours: float = Field(default=12.0, gt=0)
    login_max_failures: int = Field(default=5, ge=1)
    login_window_s: float = Field(default=300.0, gt=0)
    # The first start with no user creates this admin, with the password in this file (a
    # container secret); later starts leave users alone.
    bootstrap_admin: str | None = None
    bootstrap_password_file: Path | None = None

    @model_validator(mode="after")
    def _cert_and_key(self) -> HttpSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("http.cert_file and http.key_file go together (HTTPS needs both)")
        if (self.bootstrap_admin is None) != (self.bootstrap_password_file is None):
            raise ValueError("http.bootstrap_admin and http.bootstrap_password_file go together")
        return self

    @property
    def tls(self) -> bool:
        """Whether the server speaks HTTPS."""
        return self.cert_file is not None

    @property
    def loopback_only(self) -> bool:
        """Whether only this machine can reach the server (its address is a loopback one)."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def served_hosts(self) -> frozenset[str] | None:
        """Every Host the server answers to (None: any)."""
        if "*" in self.allowed_hosts:
            return None
        hosts = {"localhost", "127.0.0.1", "::1", *(h.lower() for h in self.allowed_hosts)}
        if self.host not in ("0.0.0.0", "::", ""):
            hosts.add(self.host.lower())
        return frozenset(hosts)


class RouterSettings(_Strict):
    """Completion, rules and the queue.

    A study whose senders are all done completes at once when every series holds the
    instance count it announces, else after ``quiet_period_s`` without new instances;
    ``study_deadline_s`` after its first instance it completes whatever its state
    (``deadline_action: route``) or is failed without routing (``discard``).
    """

    rules_dir: Path = Path("rules")
    quiet_period_s: float = Field(default=2.0, ge=0)
    completion_poll_s: float = Field(default=0.25, gt=0)
    study_deadline_s: float = Field(default=1800.0, gt=0)
    deadline_action: DeadlineAction = DeadlineAction.ROUTE
    # After a restart, studies still receiving wait this long for their senders to resend.
    restart_grace_s: float = Field(default=30.0, ge=0)
    # Routine rules marked off_hours run only inside this daily window (node's local time).
    off_hours_start: str = Field(default="19:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    off_hours_end: str = Field(default="07:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")


class InferenceSettings(_Strict):
    """The models and the Triton server that runs them."""

    models_dir: Path = Path("config/models")
    # Imported models (``airouter models import``): cards and Triton repository entries.
    imported_models_dir: Path | None = None  # default: <data_dir>/models
    # "local" starts the bundled tritonserver; otherwise host:port of a server.
    triton_url: str = "local"
    protocol: TritonProtocol = TritonProtocol.HTTP
    http_port: int = Field(default=0, ge=0, le=65535)  # local server; 0 = a free port
    grpc_port: int = Field(default=0, ge=0, le=65535)
    start_timeout_s: float = 120.0
    request_timeout_s: float = 300.0
    # Jobs wait while Triton is unavailable, retrying with backoff up to this interval.
    retry_max_s: float = Field(default=10.0, gt=0)
    shared_memory: SharedMemoryMode = SharedMemoryMode.AUTO
    # The local server loads only the models the rules use (each model is a process that
    # holds its libraries: the TorchScript one 190 MB with torch); a remote server in
    # explicit model control mode is asked to load them too.
    load_models: ModelLoading = ModelLoading.IN_USE
    # The shared-memory regions a job's requests wrote are kept this long for the next job
    # (filled again at memory speed, not first touched); 0 frees them after each job.
    shared_memory_keep_s: float = Field(default=120.0, ge=0)
    # A series whose headers say it decodes to more than this is refused before decoding.
    max_volume_mb: float = Field(default=4096.0, gt=0)

    def imported_models(self, data_dir: Path) -> Path:
        """Where ``airouter models import`` puts cards (``cards/``) and Triton entries
        (``repository/``)."""
        return self.imported_models_dir or data_dir / "models"

    def card_dirs(self, data_dir: Path) -> list[Path]:
        """The folders model cards are loaded from: the bundled ones, then the imported."""
        return [self.models_dir, self.imported_models(data_dir) / "cards"]


class EncoderSettings(_Strict):
    """What the objects the node writes say about themselves."""

    output_series: dict[OutputKind, OutputSeries] = Field(default_factory=default_output_series)
    device: DeviceSettings = Field(default_factory=DeviceSettings)
    # Site structure templates (config/templates/*.yaml) and the site's default one; a rule
    # or a destination may name another.
    templates_dir: Path = Path("config/templates")
    template: str | None = None

    @field_validator("output_series")
    @classmethod
    def _every_output_kind(
        cls, value: dict[OutputKind, OutputSeries]
    ) -> dict[OutputKind, OutputSeries]:
        """A configuration that names some kinds keeps the defaults for the others."""
        return {**default_output_series(), **value}


class DispatchSettings(_Strict):
    """The outbox: named destinations, retries, and our side of outbound associations."""

    # Named destinations rules can send to (default: EMBEDDED_DEFAULTS): kind dicom (C-STORE,
    # optional TLS), dicomweb (STOW-RS), orthanc (REST API) or folder.
    destinations: dict[str, Destination] = Field(default_factory=dict)
    max_attempts: int = Field(default=5, ge=1)
    backoff_s: float = Field(default=10.0, gt=0)  # first retry delay; doubles each attempt
    backoff_max_s: float = Field(default=600.0, gt=0)  # ... up to this
    # Our AE title on outbound associations; None: the node's (scp.ae_title).
    calling_ae_title: str | None = None
    timeouts: DimseTimeouts = Field(default_factory=DimseTimeouts)
    # Told when a job ends, waits for review, or has a STAT finding (kind webhook or fhir);
    # retried with the destinations' max_attempts and backoff_s.
    receivers: dict[str, Receiver] = Field(default_factory=dict)

    @field_validator("calling_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)


class MonitoringSettings(_Strict):
    """Models watched on the structure sets clinicians send back (approved or edited)."""

    # Compare a returned RTSTRUCT with the result of ours it delineates the series of.
    enabled: bool = True
    surface_tolerance_mm: float = Field(default=2.0, gt=0)  # of the surface Dice
    # A subgroup (a model version's cases of one sex, age band, scanner, site ...) is flagged
    # when its median Dice is below dice_threshold, or below the median of the model
    # version's other cases by more than margin; only with min_cases cases in it.
    dice_threshold: float = Field(default=0.8, ge=0, le=1)
    margin: float = Field(default=0.1, ge=0, le=1)
    min_cases: int = Field(default=5, ge=1)


class JobSettings(_Strict):
    """The workers that run jobs."""

    workers: int = Field(default=1, ge=1)
    # A job that was in flight when the node died this many times ends failed (it may be the
    # cause); a clean shutdown does not count.
    max_attempts: int = Field(default=3, ge=1)
    # Several nodes on one database: a job or delivery a node works on is leased for this
    # long, renewed every third of it while the node lives; a dead node's work is taken over
    # by another node once its lease has expired.
    lease_s: float = Field(default=60.0, ge=1.0)


class Settings(BaseSettings):
    """The node's configuration: a sub-tree per stage, units in the field names.

    The node hands each stage its own sub-tree (``settings.scp`` to the receivers,
    ``settings.dispatch`` to the outbox ...); paths under ``data_dir`` are given to them as
    arguments.
    """

    model_config = SettingsConfigDict(
        env_prefix="AIROUTER_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    # State and spool
    data_dir: Path = Path("var")
    database_url: str | None = None  # default: SQLite in data_dir
    # This node's name among the nodes sharing the database (unique among the live ones).
    # A folder name too (its own incoming and Triton folders under data_dir).
    node_name: str = Field(
        default_factory=socket.gethostname, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
    )

    scp: ScpSettings = Field(default_factory=ScpSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    encoders: EncoderSettings = Field(default_factory=EncoderSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)

    # Patient names, IDs and birth dates in log lines and API answers only when true.
    log_phi: bool = False
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _dispatch_calls_as_the_node(self) -> Settings:
        if self.dispatch.calling_ae_title is None:
            self.dispatch.calling_ae_title = self.scp.ae_title
        return self

    @property
    def spool_dir(self) -> Path:
        """Received instances."""
        return self.data_dir / "spool"

    @property
    def incoming_dir(self) -> Path:
        """Data sets being received (on the spool's filesystem: a rename moves them), in a
        folder of this node's own: nodes sharing the data directory never touch each
        other's transfers in flight (a start clears only its own)."""
        return self.data_dir / "incoming" / self.node_name

    @property
    def archive_dir(self) -> Path:
        """Objects the node produced; indexed with the received ones and served by DICOMweb."""
        return self.data_dir / "archive"

    @property
    def jobs_dir(self) -> Path:
        """Each job's artefacts: masks, probabilities, scores."""
        return self.data_dir / "jobs"

    @property
    def db_url(self) -> str:
        """The state store's SQLAlchemy URL."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'airouter.db').resolve()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags, then the environment, then the YAML file, then the embedded defaults."""
        return (init_settings, env_settings, _YamlSource(settings_cls), _Defaults(settings_cls))


# Keys of the flat layout of release 0.1, and where they live now: a file or an environment
# that still uses one is refused with the new name.
MOVED_KEYS: dict[str, str] = {
    **{
        k: f"scp.{k}"
        for k in (
            "ae_title",
            "dimse_host",
            "dimse_port",
            "max_associations",
            "allowed_calling_ae_titles",
            "allowed_source_networks",
            "check_called_ae_title",
            "maximum_pdu_size",
            "min_free_space_mb",
        )
    },
    **{k: f"scp.timeouts.{k}" for k in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s")},
    "http_host": "http.host",
    "http_port": "http.port",
    **{
        k: f"router.{k}"
        for k in (
            "rules_dir",
            "quiet_period_s",
            "completion_poll_s",
            "study_deadline_s",
            "deadline_action",
            "restart_grace_s",
            "off_hours_start",
            "off_hours_end",
        )
    },
    "models_dir": "inference.models_dir",
    "imported_models_dir": "inference.imported_models_dir",
    "triton_url": "inference.triton_url",
    **{
        f"triton_{k}": f"inference.{k}"
        for k in (
            "protocol",
            "http_port",
            "grpc_port",
            "start_timeout_s",
            "request_timeout_s",
            "retry_max_s",
            "shared_memory",
            "shared_memory_keep_s",
        )
    },
    "workers": "jobs.workers",
    "dispatch_max_attempts": "dispatch.max_attempts",
    "dispatch_backoff_s": "dispatch.backoff_s",
    "destinations": "dispatch.destinations",
    "output_series": "encoders.output_series",
    "device": "encoders.device",
}


# Defaults that other sources deep-merge into (so AIROUTER_DESTINATIONS__PACS__PORT=104 changes
# only the port). "pacs" is Orthanc's Debian default node.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "dispatch": {
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}}
    },
}


class _Defaults(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        return copy.deepcopy(EMBEDDED_DEFAULTS)


class _YamlSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by ``AIROUTER_CONFIG`` (lowest precedence)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is used instead

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get() or os.environ.get("AIROUTER_CONFIG")
        if not path:
            return {}
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        moved = [f"{k} (now {MOVED_KEYS[k]})" for k in data if k in MOVED_KEYS]
        if moved:
            raise ConfigError(f"{path}: keys moved in the settings tree: {', '.join(moved)}")
        return data


_config_file: ContextVar[str | None] = ContextVar("airouter_config_file", default=None)


class ConfigError(Exception):
    """Invalid configuration: the message names the key and the source."""


def _refuse_moved_environment() -> None:
    moved = [
        f"AIROUTER_{key.upper()} (now AIROUTER_{new.upper().replace('.', '__')})"
        for key, new in MOVED_KEYS.items()
        if f"AIROUTER_{key.upper()}" in os.environ
        or any(v.startswith(f"AIROUTER_{key.upper()}__") for v in os.environ)
    ]
    if moved:
        raise ConfigError(f"environment variables moved in the settings tree: {', '.join(moved)}")


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree once at start-up; flags are given as ``overrides``, a
    sub-tree as a mapping (``scp={"dimse_port": 104}``), merged into the other sources."""
    _refuse_moved_environment()
    token = _config_file.set(str(config_file) if config_file is not None else None)
    flags = {k: v for k, v in overrides.items() if v is not None}
    source = _config_file.get() or os.environ.get("AIROUTER_CONFIG") or "defaults/environment"
    try:
        return Settings(**flags)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration ({source}): {problems}") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read configuration: {exc}") from exc
    finally:
        _config_file.reset(token)
