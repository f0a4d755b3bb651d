"""What counting an instance in the Prometheus metrics costs the ingest, per instance:
``scp.ingest.count_outcome`` (received counter, bytes counter, label lookups) in
prometheus-client's single-process and multiprocess modes.

    .venv/bin/python bench/metrics_cost.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N = 100_000


def _one(mode: str) -> float:
    from airouter.core import metrics

    if mode == "multiprocess":
        metrics.enable_multiprocess(Path(tempfile.mkdtemp()) / "metrics", fresh=True)
    from airouter.core.vocab import Source, StoreStatus
    from scp.ingest import count_outcome

    t0 = time.perf_counter()
    for _ in range(N):
        count_outcome(StoreStatus.SUCCESS, "MODALITY", Source.DIMSE, 525_000)
    return (time.perf_counter() - t0) / N * 1e6


def main() -> None:
    """Five runs of each mode, alternating, each in a fresh interpreter; medians."""
    if len(sys.argv) == 2:
        print(_one(sys.argv[1]))
        return
    runs: dict[str, list[float]] = {"single-process": [], "multiprocess": []}
    for _ in range(5):
        for mode in runs:
            out = subprocess.run(
                [sys.executable, __file__, mode], capture_output=True, text=True, check=True
            )
            runs[mode].append(float(out.stdout))
    for mode, values in runs.items():
        each = ", ".join(f"{v:.1f}" for v in values)
        print(f"{mode}: median {statistics.median(values):.1f} us per instance ({each})")


if __name__ == "__main__":
    main()
