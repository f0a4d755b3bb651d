"""The node's worker processes: they share its DIMSE and HTTP ports and answer as it does;
one that dies is started again; a port someone else holds is refused at start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pydicom
import yaml
from sqlalchemy import func, select

from airouter.core.db import Event, Instance, Store
from tests.peers import (
    ROOT,
    NodeProcess,
    free_port,
    fresh_copy,
    head_ct_files,
    http_json,
    start_node,
    stop_process,
    wait_for,
)
from tests.test_scale import _children, _listeners


def _web_node(tmp_path: Path, name: str) -> NodeProcess:
    rules = tmp_path / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    return start_node(
        tmp_path / "node",
        None,
        wait_triton=False,
        scp={"processes": 2},
        router={"rules_dir": str(rules)},
        inference={"triton_url": f"127.0.0.1:{free_port()}"},
        node_name=name,
    )


def _stow(url: str, data: bytes) -> tuple[int, Any]:
    """One STOW-RS request of one instance, on a connection of its own."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "/dicomweb/studies",
        body,
        {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_worker_processes_share_the_http_port_and_answer_as_the_node(tmp_path: Path) -> None:
    """``scp.processes: 2``: the worker listens on the HTTP port too; requests on new
    connections reach both processes, and each answers the same (health, QIDO-RS, the rules
    and their last rejected edit); STOW-RS stores through either, every instance once; a
    SIGUSR1 (a worker's wake-up) leaves the node running; a worker killed is started again
    and the restart is in the audit trail; the workers end with the node."""
    node = _web_node(tmp_path, "web")
    store = Store(f"sqlite:///{node.data_dir / 'airouter.db'}")
    children: list[int] = []
    try:
        wait_for(lambda: _listeners(node.http_port) == 2, 60, "two listeners on the HTTP port")
        children = wait_for(lambda: _children(node.process.pid), 30, "the worker process")

        answers = [http_json(node.url + "/api/health") for _ in range(40)]
        assert all(a is not None for a in answers)
        assert {a["process"] for a in answers} == {"web", "web-r1"}
        for a in answers:  # the same answer from both, but for who gave it
            assert {k: v for k, v in a.items() if k != "process"} == {
                "status": "ok",
                "ae_title": "AIROUTER",
                "dimse_port": node.dimse_port,
                "dimse_tls_port": None,
                "triton_ready": False,
                "models_ready": a["models_ready"],
                "models_in_use": a["models_in_use"],
                "triton_pid": None,
                "jobs": {},
            }
            assert a["models_ready"] and not any(a["models_ready"].values())

        files = fresh_copy(head_ct_files()[:24], tmp_path / "study")
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        statuses = [_stow(node.url, f.read_bytes())[0] for f in files + files[:4]]
        assert statuses == [200] * 28
        with store.session() as s:
            by = dict(
                s.execute(
                    select(Instance.received_by, func.count()).group_by(Instance.received_by)
                ).all()
            )
        assert sum(by.values()) == 24 and set(by) == {"web", "web-r1"}, by
        found = [http_json(f"{node.url}/dicomweb/studies/{study}/series") for _ in range(12)]
        assert all(f is not None and len(f) == 1 for f in found)

        (tmp_path / "rules" / "broken.yaml").write_text("rules: [\n")

        def rejected_everywhere() -> bool:
            rules = [http_json(node.url + "/api/rules") for _ in range(12)]
            return all(r and r["error"] and "broken.yaml" in r["error"] for r in rules)

        wait_for(rejected_everywhere, 20, "the broken rule file seen by both processes")

        os.kill(node.process.pid, signal.SIGUSR1)  # what a worker sends after a retry
        assert http_json(node.url + "/api/health") is not None
        assert node.process.poll() is None

        os.kill(children[0], signal.SIGKILL)
        restarted = wait_for(
            lambda: [p for p in _children(node.process.pid) if p not in children], 30, "restart"
        )
        wait_for(lambda: _listeners(node.http_port) == 2, 60, "the worker listening again")
        answers = [http_json(node.url + "/api/health") for _ in range(40)]
        assert {a["process"] for a in answers if a} == {"web", "web-r1"}
        with store.session() as s:
            (event,) = s.scalars(select(Event).where(Event.kind == "worker_restarted")).all()
        assert "web-r1" in (event.detail or "") and "-9" in (event.detail or "")
        children = restarted
    finally:
        stop_process(node.process)
    for pid in children:
        wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 15, f"worker {pid} gone")


def test_a_port_someone_else_listens_on_is_refused_at_start(tmp_path: Path) -> None:
    """Shared ports (SO_REUSEPORT) are shared with the node's own processes only: a second
    node started on the HTTP or DIMSE port of a running one exits with status 2 and says
    which port is taken, instead of splitting the connections with it."""
    node = _web_node(tmp_path / "first", "first")
    try:
        for taken, ports in (
            ("HTTP", {"dimse_port": free_port(), "http_port": node.http_port}),
            ("DIMSE", {"dimse_port": node.dimse_port, "http_port": free_port()}),
        ):
            work = tmp_path / f"second-{taken}"
            work.mkdir()
            config = {
                "scp": {"dimse_port": ports["dimse_port"], "processes": 2},
                "http": {"port": ports["http_port"]},
                "data_dir": str(work / "var"),
                "router": {"rules_dir": str(tmp_path / "first" / "rules")},
                "inference": {"triton_url": f"127.0.0.1:{free_port()}"},
            }
            (work / "airouter.yaml").write_text(yaml.safe_dump(config))
            env = {k: v for k, v in os.environ.items() if not k.startswith("AIROUTER_")}
            command = [sys.executable, "-m", "airouter.app.cli", "serve", "--config"]
            second = subprocess.run(
                [*command, str(work / "airouter.yaml")],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            taken_port = ports["http_port" if taken == "HTTP" else "dimse_port"]
            assert second.returncode == 2, second.stderr[-2000:]
            assert f"{taken} port {taken_port} on" in second.stderr
            assert "is taken" in second.stderr
            assert "Traceback" not in second.stderr
        assert http_json(node.url + "/api/health")["process"] in ("first", "first-r1")
    finally:
        stop_process(node.process)


def test_a_wake_up_from_a_worker_wakes_the_job_workers_and_dispatch(tmp_path: Path) -> None:
    """What a worker process's SIGUSR1 does in the node: the signal handler only sets a flag;
    the waker thread then wakes the job workers and asks dispatch for a pass now."""
    import threading

    from airouter.app.node import Node
    from airouter.core.settings import load_settings

    (tmp_path / "rules").mkdir()
    node = Node(
        load_settings(
            data_dir=tmp_path / "var",
            router={"rules_dir": str(tmp_path / "rules")},
            inference={"models_dir": str(ROOT / "config" / "models")},
        )
    )
    waker = threading.Thread(target=node._waker, daemon=True)
    waker.start()
    assert not node._wake.is_set() and not node.dispatcher._again.is_set()
    node._on_wake_signal(signal.SIGUSR1, None)
    wait_for(node._wake.is_set, 5, "the job workers woken")
    wait_for(node.dispatcher._again.is_set, 5, "a dispatch pass asked for")
    node.stop()
    waker.join(timeout=5)
    assert not waker.is_alive()
