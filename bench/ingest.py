"""C-STORE throughput on one association: DCMTK storescp vs Orthanc vs this node.

Sends the shared 140-slice CT (fresh UIDs every round) with DCMTK storescu, alternating the
targets in each round, and records medians and ratios in docs/benchmarks.md. The node runs
with no rules, so only ingest (durable write + index) is measured.

    .venv/bin/python -m bench.ingest [--rounds 5]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import fresh_copy, median, record
from tests.peers import free_port, head_ct_files, start_node, start_orthanc, stop_process, storescu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    files = head_ct_files()

    scp_port = free_port()
    (tmp / "storescp").mkdir()
    storescp = subprocess.Popen(
        ["storescp", "-od", str(tmp / "storescp"), "-aet", "STORESCP", str(scp_port)],
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    orthanc = start_orthanc(tmp / "orthanc")
    (tmp / "rules").mkdir()
    node = start_node(
        tmp / "node",
        None,
        wait_triton=False,
        rules_dir=str(tmp / "rules"),
        triton_url="127.0.0.1:9",
    )
    targets = {
        "storescp": (scp_port, "STORESCP"),
        "Orthanc": (orthanc.dicom_port, "ORTHANC"),
        "airouter": (node.dimse_port, "AIROUTER"),
    }
    rates: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in order:
                batch = fresh_copy(files, tmp / f"round{r}-{name}")
                port, aec = targets[name]
                t0 = time.perf_counter()
                result = storescu(port, batch, aec)
                elapsed = time.perf_counter() - t0
                assert result.returncode == 0, (name, result.stderr)
                rates[name].append(len(batch) / elapsed)
                print(f"round {r} {name:9s} {len(batch) / elapsed:7.1f} instances/s")
    finally:
        stop_process(node.process)
        stop_process(orthanc.process)
        stop_process(storescp)

    med = {name: median(v) for name, v in rates.items()}
    rows = "\n".join(
        f"| {name} | {med[name]:.0f} | {', '.join(f'{v:.0f}' for v in rates[name])} |"
        for name in targets
    )
    body = f"""
140 instances of 512x512 CT (the shared head CT, fresh UIDs each round), DCMTK `storescu`
with `TCP_NODELAY=1`, one association, {args.rounds} rounds alternating the targets.
airouter acknowledges each instance only after fsync of file and directory and the SQLite
commit (synchronous=FULL); storescp writes without fsync; Orthanc stores into its SQLite index.

| target | median instances/s | per round |
|---|---|---|
{rows}

Ratios of the medians: airouter / storescp = **{med["airouter"] / med["storescp"]:.2f}**,
airouter / Orthanc = **{med["airouter"] / med["Orthanc"]:.2f}**.
"""
    record("Ingest: C-STORE on one association", body)
    print(body)


if __name__ == "__main__":
    main()
