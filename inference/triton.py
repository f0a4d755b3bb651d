"""Triton Inference Server: the local server the node starts, and the client it calls.

The local server is the ``tritonserver`` shipped in the nvidia-pytriton wheel, serving the model
repository in ``inference/model_repository`` with the Python backend. Two facts of this setup:
the backend stub embeds libpython, so the running interpreter's LIBDIR goes first on
``LD_LIBRARY_PATH``; and the stub finds its packages through the ``python`` first on ``PATH``,
so the virtual environment's ``bin`` goes first there.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from airouter.core.vocab import TritonProtocol
from inference.serving.python_model import Ref
from inference.volume import Allocator

log = logging.getLogger(__name__)

MODEL_REPOSITORY = Path(__file__).parent / "model_repository"


class InferenceUnavailable(Exception):
    """The server cannot be reached or is not ready; the job may wait and retry."""


class InferenceError(Exception):
    """The server answered with an error for this request (the model failed)."""


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
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
        model_repositories: list[Path] | None = None,
        models: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        # None: every model of the repositories; a list: only those (explicit model control,
        # the rest loaded on request, see InferenceClient.load)
        self.models = models
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        # The bundled repository first; imported models live in repositories beside it.
        self.model_repositories = [
            p for p in (model_repositories or [MODEL_REPOSITORY]) if p.is_dir()
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "tritonserver.log"
        self.pid_path = workdir / "tritonserver.pid"  # read by the node's worker processes

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
        """Start tritonserver on the configured ports; returns once the process runs."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        server = self._prepare()
        cmd = [
            str(server / "bin" / "tritonserver"),
            *(f"--model-repository={p.resolve()}" for p in self.model_repositories),
            f"--backend-directory={server / 'backends'}",
            f"--cache-directory={server / 'caches'}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            # Only the node talks to its own server: nothing else on the network may load
            # models, read the repository index or register shared memory with it.
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--allow-metrics=false",
            "--exit-timeout-secs=3",
            "--log-verbose=0",
        ]
        if self.models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd.extend(f"--load-model={m}" for m in sorted(set(self.models)))
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
        self.pid_path.write_text(str(self.process.pid))

    def alive(self) -> bool:
        """Whether the server process is running."""
        return self.process is not None and self.process.poll() is None

    def url(self, protocol: TritonProtocol | str) -> str:
        """host:port of the local server for ``protocol``."""
        http = TritonProtocol(protocol) is TritonProtocol.HTTP
        return f"127.0.0.1:{self.http_port if http else self.grpc_port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``)."""
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


OutputSpec = dict[str, tuple[np.dtype, tuple[int, ...]]]

_NP_TO_TRITON = {
    np.dtype(np.int16): "INT16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.uint8): "UINT8",
}


def is_local(url: str) -> bool:
    """Whether ``host:port`` is on this host (shared memory can only be used then)."""
    host = url.rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class _Region:
    """A POSIX shared-memory region and whether the server has it registered."""

    name: str
    handle: Any
    size: int
    registered: bool = False
    returned_at: float = 0.0


class _RegionPool:
    """The shared-memory regions of a client and its clones that no request holds now.

    A clone closes after its job; its regions come back here, still registered, for the next
    clone: on this host memory touched for the first time is slow (about 7 ms per MB, so a
    new 500 MB region costs 3.5 s to fill and a kept one 0.1 s). Regions unused for a while
    are freed (:meth:`InferenceClient.close_idle`). The regions outlive the connections,
    which belong to the thread that made them."""

    def __init__(self) -> None:
        self._free: list[_Region] = []
        self._held: dict[int, tuple[_Region, int]] = {}  # address -> (region, bytes): buffers
        self._lock = threading.Lock()
        self.registering = threading.Lock()  # one clone registers a shared buffer, not two
        self.loading = threading.Lock()  # one clone asks the server to load a model, not two
        self._numbers = itertools.count()
        self.by_reference: dict[str, bool] = {}  # model -> whether it takes REFS

    def new_name(self) -> str:
        """A region name unique on this host."""
        return f"airouter_{os.getpid()}_{id(self):x}_{next(self._numbers)}"

    def take(self, size: int) -> _Region | None:
        """The smallest free region of at least ``size`` bytes, if any, and not much larger
        (at most four times, or 1 MiB: a 128-byte affine never takes a 500 MB region)."""
        with self._lock:
            most = max(4 * size, 1 << 20)
            fitting = [r for r in self._free if size <= r.size <= most]
            if not fitting:
                return None
            region = min(fitting, key=lambda r: r.size)
            self._free.remove(region)
            return region

    def give(self, region: _Region) -> None:
        """A region back, for the next request."""
        region.returned_at = time.monotonic()
        with self._lock:
            self._free.append(region)

    def stale(self, idle_s: float) -> list[_Region]:
        """Take out the regions returned more than ``idle_s`` ago."""
        cutoff = time.monotonic() - idle_s
        with self._lock:
            out = [r for r in self._free if r.returned_at <= cutoff]
            self._free = [r for r in self._free if r.returned_at > cutoff]
        return out

    def __del__(self) -> None:  # nobody closed the first client: at least unlink the names
        if not getattr(self, "_free", None):
            return
        with contextlib.suppress(Exception):  # at interpreter exit imports may fail
            import tritonclient.utils.shared_memory as shm

            for region in self._free:
                with contextlib.suppress(Exception):
                    shm.destroy_shared_memory_region(region.handle)

    def unregister_all(self) -> None:
        """The server forgot every region (it restarted)."""
        with self._lock:
            for region in [*self._free, *(r for r, _ in self._held.values())]:
                region.registered = False
            self.by_reference.clear()  # its models may have changed too

    def hold(self, region: _Region, array: np.ndarray) -> None:
        """``region`` is lent out as the buffer of ``array`` (see InferenceClient.buffers)."""
        with self._lock:
            self._held[_address(array)] = (region, array.nbytes)

    def release(self, array: np.ndarray) -> None:
        """The buffer ``array`` is no longer used: its region goes back to the free ones."""
        with self._lock:
            region, _ = self._held.pop(_address(array))
        self.give(region)

    def holding(self, array: np.ndarray) -> _Region | None:
        """The lent region whose buffer ``array`` is (its start, at most its bytes), if any."""
        with self._lock:
            found = self._held.get(_address(array))
        return found[0] if found is not None and array.nbytes <= found[1] else None


_MADV_POPULATE_WRITE = 23  # Linux 5.14


def populate(array: np.ndarray, threads: int | None = None) -> bool:
    """Fault in the pages of ``array`` (a new mapping) for writing, from ``threads`` threads
    at once (default: one per core, at most four): a page touched for the first time costs
    about 7 ms per MB on this VM from one thread and half that from two, and a new region is
    written whole anyway (the volume built in it, a model's labels). Whether it was done
    (not on kernels without MADV_POPULATE_WRITE: the pages are then faulted as written)."""
    import ctypes

    size = array.nbytes
    if size < 1 << 20:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    start = _address(array) // page * page
    end = _address(array) + size
    count = max(1, min(threads or os.cpu_count() or 1, 4))
    step = -(-(end - start) // count // page) * page
    failed: list[int] = []

    def run(first: int) -> None:  # ctypes lets the GIL go for the call
        if madvise(first, min(step, end - first), _MADV_POPULATE_WRITE) != 0:
            failed.append(ctypes.get_errno())

    workers = [
        threading.Thread(target=run, args=(first,), name="populate")
        for first in range(start, end, step)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failed:
        log.debug("populating a %d-byte region failed: errno %s", size, failed[0])
    return not failed


def _address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


class InferenceClient:
    """tritonclient over HTTP or gRPC with binary tensors, or system shared memory.

    With ``shared_memory`` the tensors travel through POSIX shared-memory regions that this
    client registers with the server (only when the server runs on this host); the request
    then carries only their names. A client and its clones share their regions: a clone's come
    back when it closes, still registered, for the next clone (see ``_RegionPool``); they
    are registered again if the server restarted and forgot them. A model with a ``REFS``
    input (the classic models) gets the tensors that are in lent regions (``buffers``) by
    reference instead: it maps the regions itself and writes its outputs into them, with no
    copy through the Python backend's own memory (``inference.serving.python_model``).
    """

    def __init__(
        self,
        url: str,
        protocol: TritonProtocol | str = TritonProtocol.HTTP,
        request_timeout_s: float = 300.0,
        shared_memory: bool = False,
        _pool: _RegionPool | None = None,
    ) -> None:
        self.url = url
        self.protocol = TritonProtocol(protocol)
        self.request_timeout_s = request_timeout_s
        self.shared_memory = shared_memory
        self._regions: dict[str, _Region] = {}  # role (in_CT, out_LABELS) -> region held
        self._owns_pool = _pool is None  # the clones' first client frees them all on close
        self._pool = _pool or _RegionPool()
        if self.protocol is TritonProtocol.GRPC:
            import tritonclient.grpc as grpcclient

            self._mod: Any = grpcclient
            self._client: Any = grpcclient.InferenceServerClient(url)
        else:
            import tritonclient.http as httpclient

            self._mod = httpclient
            self._client = httpclient.InferenceServerClient(
                url, connection_timeout=request_timeout_s, network_timeout=request_timeout_s
            )

    def clone(self) -> InferenceClient:
        """A client with its own connection (one per thread: not thread-safe), drawing on the
        same kept regions."""
        return InferenceClient(
            self.url, self.protocol, self.request_timeout_s, self.shared_memory, self._pool
        )

    @contextlib.contextmanager
    def buffers(self) -> Iterator[Allocator]:
        """An allocator of arrays in kept shared-memory regions (plain arrays without
        shared memory), valid until the end of the ``with``: a request whose input is one of
        them names its region instead of copying it (the job's volume is built straight
        into the region Triton reads). The regions go back to the pool afterwards, for the
        next job, and the arrays must not be used then."""
        import tritonclient.utils.shared_memory as shm

        lent: list[np.ndarray] = []

        def allocate(shape: tuple[int, ...], dtype: type) -> np.ndarray:
            if not self.shared_memory:
                return np.empty(shape, dtype)
            size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
            region = self._pool.take(size)
            new = region is None
            if region is None:
                region = self._new_region(size)
            array = shm.get_contents_as_numpy(region.handle, np.dtype(dtype), shape)
            if new:
                populate(array)
            self._pool.hold(region, array)
            lent.append(array)
            return array

        try:
            yield allocate
        finally:
            for array in lent:
                self._pool.release(array)

    def _new_region(self, size: int) -> _Region:
        import tritonclient.utils.shared_memory as shm

        name = self._pool.new_name()
        return _Region(name, shm.create_shared_memory_region(name, "/" + name, size), size)

    def close(self) -> None:
        """Close the connection. A clone's regions go back to the pool; the first client's
        close (the node stopping) unregisters and frees every kept region."""
        for region in self._regions.values():
            self._pool.give(region)
        self._regions.clear()
        if self._owns_pool:
            self.close_idle(-1.0)
        with contextlib.suppress(Exception):
            self._client.close()

    def close_idle(self, idle_s: float) -> int:
        """Unregister and free the kept regions no request used for ``idle_s`` (all of them
        with a negative ``idle_s``); returns how many. Any thread may call it."""
        import tritonclient.utils.shared_memory as shm

        stale = self._pool.stale(idle_s)
        if not stale:
            return 0
        helper = self.clone()  # a connection of the calling thread's own
        try:
            for region in stale:
                if region.registered:
                    with contextlib.suppress(Exception):
                        helper._client.unregister_system_shared_memory(region.name)
                with contextlib.suppress(Exception):
                    shm.destroy_shared_memory_region(region.handle)
        finally:
            helper.close()
        return len(stale)

    def __del__(self) -> None:
        if getattr(self, "_regions", None):
            self.close()

    # -- state -----------------------------------------------------------------------------
    def is_ready(self, model: str | None = None) -> bool:
        """Whether the server (or ``model`` on it) is ready. A server that cannot be reached
        or answers an error is not ready; any other exception is a bug and is raised."""
        from tritonclient.utils import InferenceServerException

        try:
            if model is None:
                return bool(self._client.is_server_ready())
            return bool(self._client.is_model_ready(model))
        except (InferenceServerException, OSError) as exc:
            log.debug("Triton at %s not ready: %s", self.url, exc)
            return False

    def wait_ready(self, models: list[str], timeout_s: float) -> None:
        """Wait until the server and ``models`` are ready, or raise InferenceUnavailable."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.is_ready() and all(self.is_ready(m) for m in models):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        raise InferenceUnavailable(f"Triton at {self.url} not ready within {timeout_s:.0f} s")

    def load(self, model: str) -> bool:
        """Ask the server to load ``model`` unless it is ready (a server in explicit model
        control mode: the node's own loads only the models in use); whether it is ready
        now. A server that refuses (it polls its repository, or has no such model) or cannot
        be reached is logged, not raised: the caller waits as for any model not ready."""
        from tritonclient.utils import InferenceServerException

        with self._pool.loading:  # two jobs needing it: one load, not a load and a reload
            if self.is_ready(model):
                return True
            try:
                self._client.load_model(model)
            except (InferenceServerException, OSError) as exc:
                log.debug("Triton at %s did not load %s: %s", self.url, model, exc)
                return False
            log.info("Triton at %s loaded %s", self.url, model)
            return self.is_ready(model)

    def loaded_models(self) -> dict[str, str]:
        """Model name -> state as the server reports it (READY, UNAVAILABLE, ...)."""
        index = self._client.get_model_repository_index()
        if self.protocol is TritonProtocol.GRPC:
            return {m.name: m.state or "UNKNOWN" for m in index.models}
        return {m["name"]: m.get("state", "UNKNOWN") or "UNKNOWN" for m in index}

    def statistics(self, model: str) -> dict[str, float]:
        """Cumulative server-side seconds for ``model``: request, queue, compute_input,
        compute_infer, compute_output, and the count of successful requests."""
        if self.protocol is TritonProtocol.GRPC:
            from google.protobuf.json_format import MessageToDict

            raw = MessageToDict(
                self._client.get_inference_statistics(model), preserving_proto_field_name=True
            )
        else:
            raw = self._client.get_inference_statistics(model)
        out: dict[str, float] = {}
        for entry in raw.get("model_stats", []):
            stats = entry.get("inference_stats", {})
            for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
                out[key] = out.get(key, 0.0) + int(stats.get(key, {}).get("ns", 0)) / 1e9
            out["count"] = out.get("count", 0.0) + int(stats.get("success", {}).get("count", 0))
        return out

    # -- requests --------------------------------------------------------------------------
    def _region(self, role: str, size: int) -> _Region:
        """A registered shared-memory region of at least ``size`` bytes for ``role``."""

        current = self._regions.get(role)
        if current is not None and current.size < size:
            self._pool.give(current)  # another request may fit in it
            current = None
        if current is None:
            current = self._pool.take(size) or self._new_region(size)
            self._regions[role] = current
        self._register(current)
        return current

    def _register(self, region: _Region) -> None:
        with self._pool.registering:
            if not region.registered:
                name = region.name
                self._client.register_system_shared_memory(name, "/" + name, region.size)
                region.registered = True

    def _takes_refs(self, model: str) -> bool:
        """Whether ``model`` takes its tensors by reference to our regions (a ``REFS``
        input: see ``inference.serving.python_model``); asked of the server once."""
        known = self._pool.by_reference.get(model)
        if known is None:
            meta = self._client.get_model_metadata(model)
            if self.protocol is TritonProtocol.GRPC:
                names = {i.name for i in meta.inputs}
            else:
                names = {i["name"] for i in meta.get("inputs", [])}
            known = self._pool.by_reference[model] = "REFS" in names
        return known

    def _forget_registrations(self) -> None:
        """The server may have restarted: register every region again before its use."""
        for region in self._regions.values():
            region.registered = False
        self._pool.unregister_all()

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: OutputSpec,
        into: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """One request. ``outputs`` gives each output's dtype and shape (needed to size its
        shared-memory region; checked against the answer otherwise). ``into``: arrays from
        :meth:`buffers` the server writes outputs straight into (returned, not copied)."""
        from tritonclient.utils import InferenceServerException

        try:
            return self._infer(model, inputs, outputs, into or {})
        except InferenceServerException as exc:
            message = exc.message() or str(exc)
            if not self.is_ready():
                self._forget_registrations()  # a restarted server knows no regions
                raise InferenceUnavailable(f"Triton at {self.url}: {message}") from exc
            if "shared memory" in message.lower() and "region" in message.lower():
                self._forget_registrations()
                raise InferenceUnavailable(f"Triton at {self.url}: {message}") from exc
            raise InferenceError(f"model {model}: {message}") from exc
        except (ConnectionError, OSError, TimeoutError) as exc:
            self._forget_registrations()
            raise InferenceUnavailable(f"Triton at {self.url}: {exc}") from exc

    def _infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: OutputSpec,
        into: dict[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        import tritonclient.utils.shared_memory as shm

        use_shm = self.shared_memory
        refs: dict[str, dict[str, Ref]] = {"inputs": {}, "outputs": {}}
        request_inputs = []
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            datatype = _NP_TO_TRITON[array.dtype]
            held = self._pool.holding(array) if use_shm else None
            if held is not None and self._takes_refs(model):  # the model maps it itself
                refs["inputs"][name] = Ref(held.name, tuple(array.shape), array.dtype)
                continue
            tensor = self._mod.InferInput(name, list(array.shape), datatype)
            if held is not None:  # built in a region already: named, not copied
                self._register(held)
                tensor.set_shared_memory(held.name, array.nbytes)
            elif use_shm:
                region = self._region(f"in_{name}", array.nbytes)
                shm.set_shared_memory_region(region.handle, [array])
                tensor.set_shared_memory(region.name, array.nbytes)
            elif self.protocol is TritonProtocol.GRPC:
                tensor.set_data_from_numpy(array)
            else:
                tensor.set_data_from_numpy(array, binary_data=True)
            request_inputs.append(tensor)
        requested = []
        targets: dict[str, np.ndarray] = {}  # outputs written straight into a lent buffer
        for name, (dtype, shape) in outputs.items():
            target = into.get(name)
            held = None
            if use_shm and target is not None and target.dtype == dtype and target.shape == shape:
                held = self._pool.holding(target)
            if held is not None and target is not None and self._takes_refs(model):
                refs["outputs"][name] = Ref(held.name, tuple(shape), np.dtype(dtype))
                targets[name] = target
                continue
            if self.protocol is TritonProtocol.GRPC:
                out = self._mod.InferRequestedOutput(name)
            else:
                out = self._mod.InferRequestedOutput(name, binary_data=True)
            if use_shm:
                size = int(np.prod(shape)) * np.dtype(dtype).itemsize
                if held is not None and target is not None:
                    self._register(held)
                    out.set_shared_memory(held.name, size)
                    targets[name] = target
                else:
                    out.set_shared_memory(self._region(f"out_{name}", size).name, size)
            requested.append(out)
        by_ref = bool(refs["inputs"] or refs["outputs"])
        if by_ref:
            text = json.dumps(
                {part: {n: r.as_json() for n, r in given.items()} for part, given in refs.items()}
            )
            tensor = self._mod.InferInput("REFS", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
            request_inputs.append(tensor)
            requested.append(self._mod.InferRequestedOutput("WRITTEN"))
        grpc = self.protocol is TritonProtocol.GRPC
        # over HTTP the client's network_timeout bounds the request
        kwargs: dict[str, object] = {"client_timeout": self.request_timeout_s} if grpc else {}
        result = self._client.infer(model, request_inputs, outputs=requested, **kwargs)
        if by_ref:
            expected = sum(r.nbytes for r in refs["outputs"].values())
            written = result.as_numpy("WRITTEN")
            if written is None or int(written.reshape(-1)[0]) != expected:
                raise InferenceError(
                    f"model {model}: wrote {written} bytes into its outputs, not {expected}"
                )
        arrays: dict[str, np.ndarray] = {}
        for name, (dtype, shape) in outputs.items():
            if name in refs["outputs"]:
                arrays[name] = targets[name]
                continue
            if use_shm:
                answer = result.get_output(name)
                got = tuple(
                    int(d) for d in (answer["shape"] if isinstance(answer, dict) else answer.shape)
                )
                if got != tuple(shape):
                    raise InferenceError(
                        f"model {model}: output {name} has shape {got}, not {shape}"
                    )
                if name in targets:
                    arrays[name] = targets[name]
                    continue
                handle = self._regions[f"out_{name}"].handle
                arrays[name] = np.array(shm.get_contents_as_numpy(handle, np.dtype(dtype), shape))
            else:
                value = result.as_numpy(name)
                if value is None or value.shape != tuple(shape):
                    seen = None if value is None else value.shape
                    raise InferenceError(
                        f"model {model}: output {name} has shape {seen}, not {shape}"
                    )
                arrays[name] = value.astype(dtype, copy=False)
        return arrays

    def segment(
        self,
        model: str,
        hu: np.ndarray,
        affine: np.ndarray,
        extra: dict[str, np.ndarray] | None = None,
        allocate: Allocator | None = None,
    ) -> np.ndarray:
        """Run a classic (``hu_affine``) model on a volume; returns the uint8 label volume.
        ``extra`` are further inputs by tensor name (another model's mask, say); ``allocate``
        (from :meth:`buffers`) makes the array the server writes the labels into."""
        into = {}
        if allocate is not None and self.shared_memory:
            into["LABELS"] = allocate(tuple(hu.shape), np.uint8)
        result = self.infer(
            model,
            {
                "CT": hu.astype(np.int16, copy=False),
                "AFFINE": affine.astype(np.float64),
                **(extra or {}),
            },
            {"LABELS": (np.dtype(np.uint8), tuple(hu.shape))},
            into,
        )
        return result["LABELS"]

    def segment_bits(
        self,
        model: str,
        hu: np.ndarray,
        affine: np.ndarray,
        count: int,
        allocate: Allocator,
        extra: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray | None:
        """Run a classic model that writes its ``count`` labels' masks as bits (card:
        ``labels_as_bits``): (count, slices, rows, ceil(columns / 8)) uint8, label value v
        at index v - 1, in a buffer of ``allocate``. None where the labels cannot go by
        reference (no shared memory, or a model without ``REFS``): :meth:`segment` then."""
        from tritonclient.utils import InferenceServerException

        if not self.shared_memory:
            return None
        try:
            by_reference = self._takes_refs(model)
        except (InferenceServerException, OSError) as exc:
            if not self.is_ready():
                raise InferenceUnavailable(f"Triton at {self.url}: {exc}") from exc
            raise InferenceError(f"model {model}: {exc}") from exc
        if not by_reference:
            return None
        shape = (count, *hu.shape[:2], -(-hu.shape[2] // 8))
        target = allocate(shape, np.uint8)
        if self._pool.holding(target) is None:
            return None  # not a lent region: the server cannot write there
        result = self.infer(
            model,
            {
                "CT": hu.astype(np.int16, copy=False),
                "AFFINE": affine.astype(np.float64),
                **(extra or {}),
            },
            {"LABEL_BITS": (np.dtype(np.uint8), shape)},
            {"LABEL_BITS": target},
        )
        return result["LABEL_BITS"]
