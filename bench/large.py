"""A 1,000-slice 512x512 CT through the whole path: memory of every node process, and time.

The shared head CT repeated along z to 1,000 slices (fresh UIDs) is sent with DCMTK storescu
to a node running the default rule (ct-body, ct-lungs; SEG + SR + RTSTRUCT to Orthanc) with
its local tritonserver. While it works, the proportional set size (PSS: shared pages counted
once across processes) and the resident set size of the node and all its descendants (the
receiver workers, tritonserver and its Python backend stubs) are sampled every 0.1 s; the
peaks, the idle figure before the send, and the time from the last C-STORE response to the
three objects in Orthanc are recorded with the job's own timings.

    .venv/bin/python -m bench.large [--slices 1000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pydicom

from bench.common import fresh_copy, record
from bench.latency import _objects_in_orthanc
from tests.peers import head_ct_files, start_node, start_orthanc, stop_process, storescu


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def _memory_mb(pid: int) -> tuple[float, float, dict[str, float]]:
    """(PSS, RSS) of the process tree in MB, and PSS per command name."""
    pss = rss = 0.0
    by_name: dict[str, float] = {}
    for p in _descendants(pid):
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            name = Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            continue
        values = {
            line.split(":")[0]: float(line.split()[1]) / 1024
            for line in rollup.splitlines()[1:]
            if line.endswith("kB")
        }
        pss += values.get("Pss", 0.0)
        rss += values.get("Rss", 0.0)
        by_name[name] = by_name.get(name, 0.0) + values.get("Pss", 0.0)
    return pss, rss, by_name


class Sampler(threading.Thread):
    """Peak PSS and RSS of a process tree, sampled every ``every_s``."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak_pss = self.peak_rss = 0.0
        self.at_peak: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pss, rss, names = _memory_mb(self.pid)
            if pss > self.peak_pss:
                self.peak_pss, self.at_peak = pss, names
            self.peak_rss = max(self.peak_rss, rss)
            self.stop.wait(self.every_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=1000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-large-"))
    batch = fresh_copy(head_ct_files(), tmp / "ct", count=args.slices)
    study_uid = pydicom.dcmread(batch[0], stop_before_pixels=True).StudyInstanceUID
    orthanc = start_orthanc(tmp / "orthanc")
    node = start_node(tmp / "node", orthanc, router={"quiet_period_s": 2.0})
    try:
        time.sleep(3)
        idle_pss, idle_rss, _ = _memory_mb(node.process.pid)
        sampler = Sampler(node.process.pid)
        sampler.start()
        t0 = time.perf_counter()
        sent = storescu(node.dimse_port, batch)
        t_last = time.perf_counter()
        assert sent.returncode == 0, sent.stderr
        while _objects_in_orthanc(orthanc, study_uid) < 3:
            if time.perf_counter() - t_last > 900:
                raise TimeoutError("objects did not reach Orthanc")
            time.sleep(0.1)
        t_done = time.perf_counter()
        sampler.stop.set()
        sampler.join()
        job = next(j for j in node.get(f"/api/jobs?study={study_uid}"))
    finally:
        stop_process(node.process)
        stop_process(orthanc.process)
        shutil.rmtree(tmp, ignore_errors=True)
    timings = job["timings"]
    top = sorted(sampler.at_peak.items(), key=lambda kv: -kv[1])[:5]
    latency = t_done - t_last
    goal_mem = "goal <= 2048 MB: " + ("met" if sampler.peak_pss <= 2048 else "not met")
    goal_time = "goal <= 15 s: " + ("met" if latency <= 15 else "not met")
    rows = "\n".join(
        f"| {k} | {v:.2f} |"
        for k, v in timings.items()
        if k.endswith("_s") and isinstance(v, int | float)
    )
    body = f"""
A {args.slices}-slice 512x512 CT (the shared head CT repeated along z, fresh UIDs) sent with
storescu on one association to a node running the default rule (ct-body + ct-lungs; SEG, SR
and RTSTRUCT to Orthanc) with its local tritonserver. Memory of the node and every process
under it (receiver workers, tritonserver, its Python backend stubs), sampled every 0.1 s.

| measure | value |
|---|---|
| sending {args.slices} instances (storescu) | {t_last - t0:.1f} s |
| **last C-STORE response -> 3 objects in Orthanc** | **{latency:.1f} s** ({goal_time}) |
| idle, all node processes: PSS / RSS | {idle_pss:.0f} MB / {idle_rss:.0f} MB |
| **peak, all node processes: PSS** | **{sampler.peak_pss:.0f} MB** ({goal_mem}) |
| peak RSS (shared pages counted in each process) | {sampler.peak_rss:.0f} MB |
| at the peak, by process (PSS) | {", ".join(f"{n} {v:.0f} MB" for n, v in top)} |

The job's own timings (s):

| stage | s |
|---|---|
{rows}
"""
    record(f"A {args.slices:,}-slice CT through the whole path: memory and time", body)
    print(body)


if __name__ == "__main__":
    main()
