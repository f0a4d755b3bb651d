"""C-STORE throughput: DCMTK storescp vs Orthanc vs this node, 1 and 4 associations.

A 300-instance 512x512 CT series (made from the shared 140-slice CT with new UIDs and shifted
positions, fresh for every send) is sent with DCMTK storescu (TCP_NODELAY=1) over one
association, and split over 4 parallel associations, alternating the targets in each round.
Medians and ratios go to docs/benchmarks.md, with the node's peak memory (VmHWM) while it
receives a 1,000-instance study. The node runs with no rules: only ingest (durable write +
index) is measured.

    .venv/bin/python -m bench.ingest [--rounds 5] [--instances 300]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import fresh_copy, median, record
from tests.peers import (
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


def peak_memory_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instances", type=int, default=300)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    ct = head_ct_files()

    scp_port = free_port()
    (tmp / "storescp").mkdir()
    storescp = subprocess.Popen(
        ["storescp", "--fork", "-od", str(tmp / "storescp"), "-aet", "STORESCP", str(scp_port)],
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    orthanc = start_orthanc(tmp / "orthanc")
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, "-m", "bench.bare_scp", str(bare_port)])
    wait_for(lambda: _listening(bare_port), 30, "the bare pynetdicom SCP")
    (tmp / "rules").mkdir()
    node = start_node(
        tmp / "node",
        None,
        wait_triton=False,
        router={"rules_dir": str(tmp / "rules")},
        inference={"triton_url": "127.0.0.1:9"},
    )
    targets = {
        "storescp": (scp_port, "STORESCP"),
        "Orthanc": (orthanc.dicom_port, "ORTHANC"),
        "airouter": (node.dimse_port, "AIROUTER"),
        "bare pynetdicom": (bare_port, "BARE"),
    }
    rates: dict[tuple[str, int], list[float]] = {(name, n): [] for name in targets for n in (1, 4)}
    try:
        # every batch is written before any timing: no file creation or deletion during a run
        batches = {
            (r, name, n): fresh_copy(ct, tmp / f"r{r}-{name}-{n}", count=args.instances)
            for r in range(args.rounds)
            for name in targets
            for n in (1, 4)
        }
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for n in (1, 4):
                for name in order:
                    port, aec = targets[name]
                    rate = send(port, aec, batches[(r, name, n)], n)
                    rates[(name, n)].append(rate)
                    print(f"round {r} {n} assoc {name:9s} {rate:7.1f} instances/s", flush=True)
        big = fresh_copy(ct, tmp / "thousand", count=1000)
        before = peak_memory_mb(node.process.pid)
        send(node.dimse_port, "AIROUTER", big, 1)
        peak = peak_memory_mb(node.process.pid)
    finally:
        stop_process(node.process)
        stop_process(orthanc.process)
        stop_process(storescp)
        stop_process(bare)

    med = {key: median(v) for key, v in rates.items()}

    def per_round(key: tuple[str, int]) -> str:
        return ", ".join(f"{v:.0f}" for v in rates[key])

    rows = "\n".join(
        f"| {name} | {n} | {med[(name, n)]:.0f} | {per_round((name, n))} |"
        for n in (1, 4)
        for name in targets
    )
    ratios = "\n".join(
        f"| {n} | {med[('airouter', n)] / med[('storescp', n)]:.2f} | "
        f"{med[('airouter', n)] / med[('Orthanc', n)]:.2f} |"
        for n in (1, 4)
    )
    body = f"""
{args.instances} instances of 512x512 CT per send (the shared head CT repeated along z, fresh
UIDs every send), DCMTK `storescu` with `TCP_NODELAY=1`, {args.rounds} rounds alternating the
targets; "4" splits the instances over 4 parallel associations (storescp with `--fork`).
airouter answers each C-STORE only after fsync of the file and its directory and the SQLite
commit (synchronous=FULL); storescp writes without fsync; Orthanc indexes in SQLite; "bare
pynetdicom" acknowledges without storing anything (pynetdicom's own ceiling here).

| target | associations | median instances/s | per round |
|---|---|---|---|
{rows}

| associations | airouter / storescp | airouter / Orthanc |
|---|---|---|
{ratios}

Peak memory (VmHWM) of the node process after receiving a 1,000-instance study on one
association: **{peak:.0f} MB** (before: {before:.0f} MB; data sets stream to disk, none is
held in memory).
"""
    record("Ingest: C-STORE, 1 and 4 associations", body)
    print(body)


if __name__ == "__main__":
    main()
