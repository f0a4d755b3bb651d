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
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

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


class DicomNode(_Strict):
    """A remote DICOM application entity we send to by C-STORE (PACS, TPS)."""

    kind: Literal["dicom"] = "dicom"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TlsSettings | None = None
    # Ask the destination to commit to keeping what we sent (Storage Commitment Push Model,
    # N-ACTION); its N-EVENT-REPORT comes back to our AE (the destination must know it).
    storage_commitment: bool = False

    _ae = field_validator("ae_title")(_check_ae_title)


class DicomWebNode(_Strict):
    """A DICOMweb server we send to by STOW-RS (``url`` is the service root)."""

    kind: Literal["dicomweb"]
    url: str = Field(pattern=r"^https?://")
    token: str | None = None  # bearer token (AIROUTER_DESTINATIONS__<NAME>__TOKEN)
    username: str | None = None  # basic authentication
    password: str | None = None
    ca_file: Path | None = None
    timeout_s: float = Field(default=60.0, gt=0)


class OrthancNode(_Strict):
    """An Orthanc server we upload to through its REST API (orthanc-api-client)."""

    kind: Literal["orthanc"]
    url: str = Field(pattern=r"^https?://")
    username: str | None = None
    password: str | None = None


class FolderNode(_Strict):
    """A folder we write to (``<path>/<study>/<series>/<sop>.dcm``, durable before "sent")."""

    kind: Literal["folder"]
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


def default_output_series() -> dict[str, OutputSeries]:
    return {
        "SEG": OutputSeries(number=901, description="AI segmentation"),
        "SR": OutputSeries(number=902, description="AI measurements"),
        "RTSTRUCT": OutputSeries(number=903, description="AI structures"),
        "PROBABILITY_MAP": OutputSeries(number=904, description="AI probability map"),
    }


class Settings(BaseSettings):
    """The node's configuration; units are in the field names."""

    model_config = SettingsConfigDict(
        env_prefix="AIROUTER_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    # DIMSE
    ae_title: str = "AIROUTER"
    dimse_host: str = "0.0.0.0"
    dimse_port: int = Field(default=11112, ge=0, le=65535)
    max_associations: int = Field(default=16, ge=1)
    # Access control, off by default: empty lists allow everyone.
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)  # else A-ASSOCIATE-RJ
    allowed_source_networks: list[str] = Field(default_factory=list)  # CIDR; else TCP closed
    check_called_ae_title: bool = False  # reject associations not addressed to ae_title
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    maximum_pdu_size: int = Field(default=0, ge=0)  # 0 = unlimited

    # HTTP: DICOMweb of the node's archive and the REST API
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)

    # State and spool
    data_dir: Path = Path("var")
    # Refuse new instances (0xA700) while the data directory's filesystem has less free space.
    min_free_space_mb: float = Field(default=256.0, ge=0)
    database_url: str | None = None  # default: SQLite in data_dir

    # Completion: a study is complete once its associations are released and no instance
    # arrived for this long.
    # Completion signals (scp/completion.py): a study whose senders are all done completes at
    # once when every series holds the instance count it announces, else after quiet_period_s
    # without new instances; study_deadline_s after its first instance it completes whatever
    # its state (deadline_action "route") or is failed without routing ("discard").
    quiet_period_s: float = Field(default=2.0, ge=0)
    completion_poll_s: float = Field(default=0.25, gt=0)
    study_deadline_s: float = Field(default=1800.0, gt=0)
    deadline_action: str = Field(default="route", pattern="^(route|discard)$")
    # After a restart, studies still receiving wait this long for their senders to resend.
    restart_grace_s: float = Field(default=30.0, ge=0)

    # Rules and models
    rules_dir: Path = Path("rules")
    # Routine rules marked off_hours run only inside this daily window (node's local time).
    off_hours_start: str = Field(default="19:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    off_hours_end: str = Field(default="07:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")
    models_dir: Path = Path("config/models")

    # Inference: "local" starts the bundled tritonserver; otherwise host:port of a server.
    triton_url: str = "local"
    triton_protocol: str = Field(default="http", pattern="^(http|grpc)$")
    triton_http_port: int = Field(default=0, ge=0, le=65535)  # local server; 0 = a free port
    triton_grpc_port: int = Field(default=0, ge=0, le=65535)
    triton_start_timeout_s: float = 120.0
    triton_request_timeout_s: float = 300.0
    # Jobs wait while Triton is unavailable, retrying with backoff up to this interval.
    triton_retry_max_s: float = Field(default=10.0, gt=0)
    # System shared memory for tensors: "auto" uses it when the server is on this host.
    triton_shared_memory: str = Field(default="auto", pattern="^(auto|on|off)$")
    # Imported models (``airouter models import``): cards and Triton repository entries.
    imported_models_dir: Path | None = None  # default: data_dir/models

    # Workers and dispatch
    workers: int = Field(default=1, ge=1)
    dispatch_max_attempts: int = Field(default=5, ge=1)
    dispatch_backoff_s: float = Field(default=10.0, gt=0)

    output_series: dict[str, OutputSeries] = Field(default_factory=default_output_series)
    # Named destinations rules can send to (default: EMBEDDED_DEFAULTS): kind dicom (C-STORE,
    # optional TLS), dicomweb (STOW-RS), orthanc (REST API) or folder.
    destinations: dict[str, Destination] = Field(default_factory=dict)
    device: DeviceSettings = Field(default_factory=DeviceSettings)

    log_phi: bool = False
    log_level: str = "INFO"

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("output_series")
    @classmethod
    def _every_output_kind(cls, value: dict[str, OutputSeries]) -> dict[str, OutputSeries]:
        """A configuration that names some kinds keeps the defaults for the others."""
        return {**default_output_series(), **value}

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

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def archive_dir(self) -> Path:
        """Objects the node produced; indexed with the received ones and served by DICOMweb."""
        return self.data_dir / "archive"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def imported_models(self) -> Path:
        """Where ``airouter models import`` puts cards (``cards/``) and Triton entries
        (``repository/``)."""
        return self.imported_models_dir or self.data_dir / "models"

    @property
    def card_dirs(self) -> list[Path]:
        return [self.models_dir, self.imported_models / "cards"]

    @property
    def model_repositories(self) -> list[Path]:
        from inference.triton import MODEL_REPOSITORY

        return [MODEL_REPOSITORY, self.imported_models / "repository"]

    @property
    def db_url(self) -> str:
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
        return (init_settings, env_settings, _YamlSource(settings_cls), _Defaults(settings_cls))


# Defaults that other sources deep-merge into (so AIROUTER_DESTINATIONS__PACS__PORT=104 changes
# only the port). "pacs" is Orthanc's Debian default node.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}},
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
        return data


_config_file: ContextVar[str | None] = ContextVar("airouter_config_file", default=None)


class ConfigError(Exception):
    """Invalid configuration: the message names the key and the source."""


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree once at start-up; flags are given as ``overrides``."""
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
