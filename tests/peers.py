"""Real peers for the tests: Orthanc (with DICOMweb) and the node itself, as processes.

Both start on free ports with temporary configuration and are waited on by deadline, never by
fixed sleeps.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
SHARED_DICOM = Path(os.environ.get("AIROUTER_SHARED_DICOM", ROOT.parent / "shared" / "dicom"))
HEAD_CT = SHARED_DICOM / "ct-philips-head-phantom/In/Philips/S21570/S2020"
HEAD_SCOUT = SHARED_DICOM / "ct-philips-head-phantom/In/Philips/S21570/S1000"
BODY_J2K = SHARED_DICOM / "ct-siemens-body-j2k/tests/reference_files/example_ct_dicom"
MR_EPI = SHARED_DICOM / "mr-ge-epi/In/20180918GE/mr_0004"
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.2
) -> Any:
    """Poll until ``condition()`` is truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def http_json(
    url: str,
    timeout_s: float = 10.0,
    auth: tuple[str, str] | None = None,
    token: str | None = None,
    ca_file: Path | None = None,
) -> Any:
    """GET ``url`` as JSON (None when nothing answers); basic ``auth`` or a bearer
    ``token``; HTTPS verified against ``ca_file``."""
    request = urllib.request.Request(url)
    if auth is not None:
        basic = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def http_bytes(url: str, timeout_s: float = 30.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return bytes(response.read())


def fresh_copy(files: list[Path], out: Path, count: int | None = None) -> list[Path]:
    """One new series (new Study/Series/SOP UIDs) of ``count`` instances made from ``files``:
    past the last file the slices repeat, shifted along z beyond the previous block, so that
    every round of a benchmark or test stores new instances and a consistent volume."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    datasets = [pydicom.dcmread(f) for f in files]
    z = sorted(float(ds.ImagePositionPatient[2]) for ds in datasets)
    step = min((b - a for a, b in itertools.pairwise(z) if b > a), default=1.0)
    block = z[-1] - z[0] + step
    written = []
    for k in range(count or len(datasets)):
        ds = datasets[k % len(datasets)]
        shift = (k // len(datasets)) * block
        ds = copy.deepcopy(ds) if shift else ds
        if shift:
            x, y, z0 = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, round(z0 + shift, 4)]
            if "SliceLocation" in ds:
                ds.SliceLocation = round(float(ds.SliceLocation) + shift, 4)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        path = out / f"{k:05d}.dcm"
        ds.save_as(path)
        written.append(path)
    return written


def head_ct_files() -> list[Path]:
    """The 140 image files of the head CT (the folder also holds a Philips DIRFILE)."""
    return sorted(p for p in HEAD_CT.iterdir() if p.name.startswith("I"))


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    process: subprocess.Popen[bytes]
    auth: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        return http_json(self.url + path, auth=self.auth)

    def post(self, path: str, body: Any, timeout_s: float = 60.0) -> Any:
        """POST ``body`` as JSON to its REST API; its JSON answer (an HTTP error raises)."""
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST"
        )
        request.add_header("Content-Type", "application/json")
        if self.auth is not None:
            basic = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {basic}")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read()
        return json.loads(text) if text.strip() else None


def start_orthanc(
    workdir: Path,
    http_port: int = 0,
    dicom_port: int = 0,
    user: tuple[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Orthanc:
    """Orthanc on free ports (or the given ones: a restart keeps its storage in ``workdir``);
    with ``user``, HTTP needs that user's basic authentication."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = http_port or free_port(), dicom_port or free_port()
    config = {
        "Name": "airouter-test-pacs",
        "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": user is not None,
        "DicomCheckCalledAet": False,
        "Plugins": [str(ORTHANC_DICOMWEB)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **({"RegisteredUsers": {user[0]: user[1]}} if user else {}),
        **(extra or {}),
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 - lives as long as the process
    # Orthanc links DCMTK, which stalls 40 ms per message without TCP_NODELAY=1 in the
    # environment of the receiving process too (21 instances/s instead of 271).
    process = subprocess.Popen(
        ["Orthanc", str(workdir / "orthanc.json")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    orthanc = Orthanc(http_port, dicom_port, "ORTHANC", process, user)
    wait_for(lambda: orthanc.get("/system"), 30, "Orthanc to answer")
    return orthanc


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


@dataclass
class NodeProcess:
    process: subprocess.Popen[bytes]
    data_dir: Path
    dimse_port: int
    http_port: int
    ae_title: str
    log_path: Path
    ca_file: Path | None = None  # HTTPS: the CA its certificate is verified against
    token: str | None = None  # a bearer token for its API (once it has users)

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        return http_json(self.url + path, token=self.token, ca_file=self.ca_file)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` deep-merged into it (a settings sub-tree changes key by key)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def start_node(
    workdir: Path,
    orthanc: Orthanc | None,
    wait_triton: bool = True,
    ca_file: Path | None = None,
    token: str | None = None,
    **settings: Any,
) -> NodeProcess:
    """Run ``airouter serve`` with a temporary config; wait until it answers (and Triton).

    ``settings`` are sections of the settings tree (``router={"quiet_period_s": 0.5}``),
    merged key by key into the test defaults. ``ca_file``: the node speaks HTTPS with a
    certificate of that CA; ``token``: its API wants one."""
    workdir.mkdir(parents=True, exist_ok=True)
    dimse_port, http_port = free_port(), free_port()
    config: dict[str, Any] = {
        # one receiver process (the default is one per core): the suites run many nodes at
        # once; tests/test_scale.py and tests/test_two_nodes.py run several
        "scp": {"ae_title": "AIROUTER", "dimse_port": dimse_port, "processes": 1},
        "http": {"port": http_port},
        "data_dir": str(workdir / "var"),
        "router": {"rules_dir": str(ROOT / "rules")},
        "inference": {"models_dir": str(ROOT / "config" / "models")},
        "dispatch": {"backoff_s": 1.0},
    }
    if orthanc is not None:
        pacs = {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
        config["dispatch"]["destinations"] = {"pacs": pacs}
    config = merged(config, settings)
    config_path = workdir / "airouter.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIROUTER_")}
    log_path = workdir / "node.log"
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    process = subprocess.Popen(
        [sys.executable, "-m", "airouter.app.cli", "serve", "--config", str(config_path)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    node = NodeProcess(
        process,
        workdir / "var",
        int(config["scp"]["dimse_port"]),
        http_port,
        "AIROUTER",
        log_path,
        ca_file,
        token,
    )

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"node exited early:\n{node.log_text()[-3000:]}")
        health = node.get("/api/health")
        models_ready = health and all(
            health["models_ready"].get(m) for m in health.get("models_in_use", [])
        )
        return bool(health and ((health.get("triton_ready") and models_ready) or not wait_triton))

    wait_for(ready, 120, "the node and its Triton models")
    return node


def storescu(
    port: int, files: list[Path], aec: str = "AIROUTER", *extra: str, aet: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu as the modality, calling as ``aet`` (TCP_NODELAY avoids Debian DCMTK's
    40 ms stalls)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmd = [
        "storescu",
        "-aet",
        aet,
        "-aec",
        aec,
        *extra,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; `make test` installs it")
    return path


PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


@dataclass
class Postgres:
    """A real PostgreSQL server (Debian's), in a temporary directory on a free port. It
    refuses to run as root: as root, its directory belongs to the ``postgres`` user and every
    server command runs as that user."""

    datadir: Path
    port: int

    @staticmethod
    def _as_server(command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    @classmethod
    def start(cls) -> Postgres:
        """In a new folder of its own under the system's temporary folder (a test's folder
        lies under a root-only one that the server's user cannot enter)."""
        import tempfile

        if PG_BIN is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        workdir = Path(tempfile.mkdtemp(prefix="airouter-pg-"))
        if os.geteuid() == 0:
            shutil.chown(workdir, "postgres", "postgres")
        datadir, port = workdir / "data", free_port()
        subprocess.run(
            cls._as_server(
                [str(PG_BIN / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust"]
            ),
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=on"
        subprocess.run(
            cls._as_server(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(datadir),
                    "-o",
                    options,
                    "-l",
                    str(workdir / "server.log"),
                    "-w",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        return cls(datadir, port)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on this server; its SQLAlchemy URL."""
        import psycopg

        name = f"t{generate_uid(prefix=None).replace('.', '')[:20]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(
            self._as_server(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "stop"]
            ),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(self.datadir.parent, ignore_errors=True)
