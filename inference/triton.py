"""Triton Inference Server: the local server the node starts, and the client it calls.

The local server is the ``tritonserver`` shipped in the nvidia-pytriton wheel, serving the model
repository in ``inference/model_repository`` with the Python backend. Two facts of this setup:
the backend stub embeds libpython, so the running interpreter's LIBDIR goes first on
``LD_LIBRARY_PATH``; and the stub finds its packages through the ``python`` first on ``PATH``,
so the virtual environment's ``bin`` goes first there.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MODEL_REPOSITORY = Path(__file__).parent / "model_repository"


class InferenceUnavailable(Exception):
    """The server cannot be reached or is not ready; the job may wait and retry."""


class InferenceError(Exception):
    """The server answered with an error for this request (the model failed)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalTriton:
    """Start and stop the bundled tritonserver as a child process."""

    def __init__(
        self,
        workdir: Path,
        http_port: int = 0,
        grpc_port: int = 0,
        model_repository: Path = MODEL_REPOSITORY,
    ) -> None:
        self.workdir = workdir
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.model_repository = model_repository
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "tritonserver.log"

    def _prepare(self) -> Path:
        """Copy the server out of the wheel with the stub for this Python (as PyTriton does)."""
        import pytriton

        dist = Path(pytriton.__file__).parent / "tritonserver"
        target = self.workdir / "server"
        stamp = target / ".source"
        if not (stamp.exists() and stamp.read_text() == str(dist)):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(dist, target, ignore=shutil.ignore_patterns("python_backend_stubs"))
            version = f"{sys.version_info.major}.{sys.version_info.minor}"
            stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
            shutil.copy(stub, target / "backends" / "python" / "triton_python_backend_stub")
            stamp.write_text(str(dist))
        return target

    def _env(self) -> dict[str, str]:
        import pytriton

        env = dict(os.environ)
        libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        server = self._prepare()
        cmd = [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--exit-timeout-secs=3",
            "--log-verbose=0",
        ]
        log.info("starting tritonserver (http %s, grpc %s)", self.http_port, self.grpc_port)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                cmd,
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop it in order
                preexec_fn=_die_with_parent,
            )

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.http_port if protocol == 'http' else self.grpc_port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        log.info("tritonserver stopped")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the node dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class InferenceClient:
    """tritonclient over HTTP or gRPC with binary tensors."""

    def __init__(self, url: str, protocol: str = "http", request_timeout_s: float = 300.0) -> None:
        self.url = url
        self.protocol = protocol
        self.request_timeout_s = request_timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as grpcclient

            self._mod = grpcclient
            self._client = grpcclient.InferenceServerClient(url)
        else:
            import tritonclient.http as httpclient

            self._mod = httpclient
            self._client = httpclient.InferenceServerClient(
                url, connection_timeout=request_timeout_s, network_timeout=request_timeout_s
            )

    def clone(self) -> InferenceClient:
        """A client with its own connection (one per thread: the clients are not thread-safe)."""
        return InferenceClient(self.url, self.protocol, self.request_timeout_s)

    def is_ready(self, model: str | None = None) -> bool:
        try:
            if model is None:
                return bool(self._client.is_server_ready())
            return bool(self._client.is_model_ready(model))
        except Exception:
            return False

    def wait_ready(self, models: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.is_ready() and all(self.is_ready(m) for m in models):
                return
            time.sleep(0.2)
        raise InferenceUnavailable(f"Triton at {self.url} not ready within {timeout_s:.0f} s")

    def segment(self, model: str, hu: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """Run a segmentation model on a volume; returns the uint8 label volume."""
        from tritonclient.utils import InferenceServerException

        ct = self._mod.InferInput("CT", list(hu.shape), "INT16")
        af = self._mod.InferInput("AFFINE", [4, 4], "FP64")
        if self.protocol == "grpc":
            ct.set_data_from_numpy(np.ascontiguousarray(hu, dtype=np.int16))
            af.set_data_from_numpy(np.ascontiguousarray(affine, dtype=np.float64))
            kwargs: dict[str, object] = {"client_timeout": self.request_timeout_s}
        else:
            ct.set_data_from_numpy(np.ascontiguousarray(hu, dtype=np.int16), binary_data=True)
            af.set_data_from_numpy(np.ascontiguousarray(affine, dtype=np.float64), binary_data=True)
            kwargs = {}  # network_timeout of the client bounds the request
        try:
            result = self._client.infer(model, [ct, af], **kwargs)
        except InferenceServerException as exc:
            if not self.is_ready():
                raise InferenceUnavailable(f"Triton at {self.url}: {exc}") from exc
            raise InferenceError(f"model {model}: {exc.message()}") from exc
        except (ConnectionError, OSError) as exc:
            raise InferenceUnavailable(f"Triton at {self.url}: {exc}") from exc
        labels = result.as_numpy("LABELS")
        if labels is None or labels.shape != hu.shape:
            raise InferenceError(f"model {model}: output shape differs from the input")
        return labels
