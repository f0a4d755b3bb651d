"""C-STORE throughput: DCMTK storescp vs Orthanc vs this node, 1, 4 and 10 associations.

A 300-instance 512x512 CT series (made from the shared 140-slice CT with new UIDs and shifted
positions, fresh for every send) is sent with DCMTK storescu over one association, and split
over 4 and 10 parallel associations, alternating the targets in each round. Every DCMTK
process has TCP_NODELAY=1 in its environment, the receiving storescp and Orthanc included.
The node runs on SQLite (one process, the embedded default) and on PostgreSQL with one
worker process per core (``--workers``). Medians and ratios go to docs/benchmarks.md, with
the peak memory (VmHWM) of all the node's processes together after a 1,000-instance study. The
node runs with no rules: only ingest (durable write + index) is measured.

    .venv/bin/python -m bench.ingest [--rounds 3] [--instances 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import fresh_copy, median, record
from tests.peers import (
    Postgres,
    free_port,
    head_ct_files,
    start_node,
    start_orthanc,
    stop_process,
    wait_for,
)


def send(port: int, aec: str, files: list[Path], associations: int) -> float:
    """Instances per second for sending ``files`` over ``associations`` parallel storescu."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    groups = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, g)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for g in groups
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-500:]
    return len(files) / (time.perf_counter() - t0)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def processes_of(pid: int) -> list[int]:
    """``pid`` and its child processes (the node's receivers)."""
    found = [pid]
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{pid}\n" in status.read_text():
                found.append(int(status.parent.name))
        except OSError:
            continue
    return found


def peak_memory_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--associations", default="1,4,10")
    args = parser.parse_args()
    levels = [int(n) for n in args.associations.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    ct = head_ct_files()
    cores = os.cpu_count() or 1

    scp_port = free_port()
    (tmp / "storescp").mkdir()
    storescp = subprocess.Popen(
        ["storescp", "--fork", "-od", str(tmp / "storescp"), "-aet", "STORESCP", str(scp_port)],
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    orthanc = start_orthanc(tmp / "orthanc")  # TCP_NODELAY=1 in its environment (tests.peers)
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, "-m", "bench.bare_scp", str(bare_port)])
    wait_for(lambda: _listening(bare_port), 30, "the bare pynetdicom SCP")
    postgres = Postgres.start()
    (tmp / "rules").mkdir()
    quiet = {
        "wait_triton": False,
        "router": {"rules_dir": str(tmp / "rules")},
        "inference": {"triton_url": "127.0.0.1:9"},
    }
    # all the senders are one address: allow it the ten associations (default 8 per process)
    per_source = {"max_associations_per_source": 16}
    sqlite_node = start_node(
        tmp / "node-sqlite",
        None,
        scp=per_source,
        **quiet,  # type: ignore[arg-type]
    )
    sqlite_many = start_node(
        tmp / "node-sqlite-many",
        None,
        scp={"processes": cores, **per_source},
        **quiet,  # type: ignore[arg-type]
    )
    pg_node = start_node(
        tmp / "node-pg",
        None,
        database_url=postgres.new_database(),
        scp={"processes": cores, **per_source},
        **quiet,  # type: ignore[arg-type]
    )
    for many in (sqlite_many, pg_node):
        pid = many.process.pid
        wait_for(lambda p=pid: len(processes_of(p)) == cores, 60, "the receivers")
    time.sleep(5)  # the receivers import and bind (they log "DIMSE listening")
    pg_label = f"airouter PostgreSQL x{cores}"
    many_label = f"airouter SQLite x{cores}"
    nodes = {"airouter SQLite": sqlite_node, many_label: sqlite_many, pg_label: pg_node}
    targets = {
        "storescp": (scp_port, "STORESCP"),
        "Orthanc": (orthanc.dicom_port, "ORTHANC"),
        "airouter SQLite": (sqlite_node.dimse_port, "AIROUTER"),
        many_label: (sqlite_many.dimse_port, "AIROUTER"),
        pg_label: (pg_node.dimse_port, "AIROUTER"),
        "bare pynetdicom": (bare_port, "BARE"),
    }
    rates: dict[tuple[str, int], list[float]] = {(t, n): [] for t in targets for n in levels}
    memory: dict[str, tuple[float, float]] = {}
    try:
        # every batch is written before any timing: no file creation or deletion during a run
        batches = {
            (r, name, n): fresh_copy(ct, tmp / f"r{r}-{_slug(name)}-{n}", count=args.instances)
            for r in range(args.rounds)
            for name in targets
            for n in levels
        }
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for n in levels:
                for name in order:
                    port, aec = targets[name]
                    rate = send(port, aec, batches[(r, name, n)], n)
                    rates[(name, n)].append(rate)
                    print(f"round {r} {n:2d} assoc {name:26s} {rate:7.1f} instances/s", flush=True)
        for label, node in nodes.items():
            big = fresh_copy(ct, tmp / f"thousand-{_slug(label)}", count=1000)
            pids = processes_of(node.process.pid)
            before = sum(peak_memory_mb(p) for p in pids)
            send(node.dimse_port, "AIROUTER", big, 1)
            memory[label] = (before, sum(peak_memory_mb(p) for p in pids))
    finally:
        for node in nodes.values():
            stop_process(node.process)
        stop_process(orthanc.process)
        stop_process(storescp)
        stop_process(bare)
        postgres.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # 15-20 GB of batches: the disk fills otherwise

    med = {key: median(v) for key, v in rates.items()}

    def per_round(key: tuple[str, int]) -> str:
        return ", ".join(f"{v:.0f}" for v in rates[key])

    rows = "\n".join(
        f"| {name} | {n} | {med[(name, n)]:.0f} | {per_round((name, n))} |"
        for n in levels
        for name in targets
    )
    ratios = "\n".join(
        f"| {label} | {n} | {med[(label, n)] / med[('storescp', n)]:.2f} | "
        f"{med[(label, n)] / med[('Orthanc', n)]:.2f} | "
        f"{med[(label, n)] / med[(label, levels[0])]:.2f} |"
        for label in nodes
        for n in levels
    )
    peaks = "\n".join(
        f"| {label} | {before:.0f} | {after:.0f} |" for label, (before, after) in memory.items()
    )
    body = f"""
{args.instances} instances of 512x512 CT per send (the shared head CT repeated along z, fresh
UIDs every send), DCMTK `storescu`, {args.rounds} rounds alternating the targets; "4" and
"10" split the instances over that many parallel associations (storescp with `--fork`).
Every DCMTK process has `TCP_NODELAY=1` in its environment, the receiving storescp and
Orthanc included (without it Orthanc stalls 40 ms per message: the "3.1x Orthanc" recorded
before was that artefact). airouter serves these associations with its own acceptor
(`scp/native.py`) and answers each C-STORE only after fsync of the file, its hard link into
the spool, fsync of the folder and the index commit, which does not wait for an fsync of its
own (`scp.sync_index_commits: false`, the default: a durability mark follows within seconds,
and rows a power cut takes are rebuilt from the spool at start): SQLite (WAL,
synchronous=NORMAL) in one process and with {cores} worker processes on the port (the
default, one per core), PostgreSQL (synchronous_commit off) with {cores}. The one sender
address may hold 16 associations (`scp.max_associations_per_source`, default 8). storescp
writes without fsync; Orthanc indexes in SQLite; "bare pynetdicom" acknowledges without
storing anything (pynetdicom's own ceiling, one process).

| target | associations | median instances/s | per round |
|---|---|---|---|
{rows}

| node | associations | / storescp | / Orthanc | / itself at 1 |
|---|---|---|---|---|
{ratios}

Peak memory (VmHWM, all the node's processes together) before and after receiving a
1,000-instance study on one association:

| node | before MB | after MB |
|---|---|---|
{peaks}
"""
    record("Ingest: C-STORE, 1, 4 and 10 associations", body)
    print(body)


if __name__ == "__main__":
    main()
