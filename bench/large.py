"""A 1,000-slice 512x512 CT through the whole path: memory of every node process, and time.

The shared head CT repeated along z to 1,000 slices (fresh UIDs) is sent with DCMTK storescu
to a node running the default rule (ct-body, ct-lungs; SEG + SR + RTSTRUCT to Orthanc) with
its local tritonserver. While it works, the proportional set size (PSS: shared pages counted
once across processes) and the resident set size of the node and all its descendants (the
receiver workers, tritonserver and its Python backend stubs) are sampled every 0.1 s; the
peaks, the idle figure before the send, and the time from the last C-STORE response to the
three objects in Orthanc are recorded with the job's own timings, for the node's first study
and for the next ones (memory a process touches for the first time is slow on this machine).

    .venv/bin/python -m bench.large [--slices 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom

from bench.common import fresh_copy, record
from bench.latency import send_and_wait
from tests.peers import head_ct_files, start_node, start_orthanc, stop_process


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


NOTES = """\
Issue 15, in order. The first run (before the models' and the encoders' memory work, an Intel
Xeon host) peaked at **11,858 MB** PSS (Python backend stubs 8,244 MB, the node 2,579 MB,
tritonserver 1,035 MB) and took **119.6 s**; after that work 8,145 MB and 87.8 s (encode
17.6 s); with the SEG's frames written by us, the RTSTRUCT traced by array marching squares and
ct-lungs taking ct-body's body, 7,511 MB and 80.4 s (encode 3.3 s); with the connected
components labelled 64 slices at a time and joined across the slab boundaries (scipy's `label`
holds an int64 copy of the whole volume, 2 GB here, whatever output type it is given) and
ct-lungs numbering only the air components large enough to be a lung, 5,622 MB and 51.7 s on
an AMD EPYC host (the code before, just before on that host: 7,540 MB and 65.8 s). The
encoders' later work (bounding boxes shared, contours walked by scipy's graph routines, the
garbage collector paused) brought encode from 3.9 s to about 1 s.

On 2026-12-03 (second session, same host; its speed moved within the hour: storescu took
3.0-12.5 s for the same send) six changes, measured one after another with this bench:
ct-body and ct-lungs decide connectivity on a ~2 mm block grid and draw the boundary at full
resolution (`inference/blocks.py`; on this volume in one process ct-body 18.5 -> 3.6 s,
ct-lungs 9.0 -> 1.0 s; on a noisy 0.7 mm phantom the grid and full resolution differ by 3
voxels in 100,000): 63.3 s / 37.3 s (first study / second, a slow hour); the inference
client's shared-memory regions kept between jobs instead of new ones per job and model:
56.2 s / 26.6 s; ct-body's body sent to ct-lungs as bits (33 MB instead of 262 MB) and
ct-body's answer written into a buffer its stub keeps: 51.9 s / 20.8 s; the volume built
straight into a kept region that Triton reads by name (no copy of the CT per model): 40.0 s /
13.6 s, peak 4,974 / 5,174 MB; a model answer of 0 and 1 taken as its structure's mask
without a copy, attenuation measured a slab at a time: 30.6 s / 13.7 s, 4,451 / 4,574 MB;
the classic models' labels written by Triton straight into the job's lent regions (no copy
per model in the node): 25.0 s / 13.5 s, 4,192 / 4,580 MB.

On 2026-12-03 (third session, same host, as noisy: storescu took 2.3-9.1 s for the same
send): the classic models take their tensors by reference (a `REFS` input naming the node's
shared-memory regions; the Python backend stub maps them, reads the CT and ct-body's bits
there and writes the labels into the job's buffers): no copy of the CT into each stub's pool
and none of the labels out of it, 24.9 s / 13.0 s, peak 2,423 / 2,613 MB (the stubs and
tritonserver went from 2.6 GB at the peak to 0.35 GB); a structure's mask written only on
the slabs its label is on (ct-lungs finds no lung in a head CT: its two masks cost 2 x 262 MB
of zeros before, nothing now): 33.1 s / 16.3 s and 2,178 / 2,387 MB in a slow hour (the
volume build alone took 9.2 s on the first study), then the figures above half an hour later.

On 2026-12-03 (fourth session, same host; storescu took 2.4-7.6 s for the same send), one
change after another: the code as the third session left it, 26.9 s / 13.0 s, 2,171 / 2,383
MB; Triton loading only the models the rules run (`inference.load_models: in_use`: no
ct-lungs-unet stub with torch, 190 MB) and the node importing torch and MONAI only for a
network model in use (240 MB; the node idles at 0.3 GB, was 0.7): 22.5 s / 15.1 s, 1,794 /
1,994 MB; ct-lungs writing each lung's mask as bits into the node's region (card:
`labels_as_bits`; 66 MB instead of a 262 MB label volume): 22.1 s / 11.4 s, 1,590 / 1,770 MB;
a new shared-memory region faulted in from both cores before it is lent (MADV_POPULATE_WRITE:
memory touched for the first time cost 5.4-7.4 ms per MB from one thread here, 2.9-3.5 from
two; the volume build went from 5.5 s to 1.8 s on a first study): 15.7 s / 10.8 s, then
15.0 s / 11.2 s in the next run, 1,588-1,646 / 1,757-1,788 MB; the encoders' working memory
cut (the SEG's frames packed 64 planes at a time instead of from a copy of the whole mask,
238 -> 64 MB; the RTSTRUCT's coordinates formatted 65,536 at a time, 168 -> 100 MB):
15.8 s / 11.1 s, 1,592 / 1,679 MB (encode 2.44 s / 0.94 s), then 15.0 s / 10.6 s and 1,604 /
1,726 MB.

On 2026-12-07 (fifth session, an Intel Xeon host; storescu took 2.6-4.9 s for the same send):
the code as the fourth session left it, 15.5 s / 11.6 s, 1,631 / 1,702 MB (and 14.9 s for one
more first study); a job's empty masks named in its masks.npz instead of packed and
compressed (ct-lungs finds no lung on the head CT: masks 0.62 -> 0.33 s), 13.6 s / 11.7 s;
each structure's contours, and a structure's slabs, traced on both cores: 15.3 s / 12.1 s,
then 14.3 s / 11.3 s, 1,641-1,660 / 1,716-1,779 MB; the SR built from a stub of its tree
(encode of this study 1.65-1.72 -> 1.37 s on the first study): 13.7 s / 12.8 s, 1,641 / 1,727
MB (the table; the second study's volume build and models were slower in that run). From one
run to the next the first study's volume build took 1.75-2.93 s (the CT's region touched for
the first time), ct-body 2.6-3.1 s and the C-STORE of the three objects to Orthanc 2.1-2.4 s.

What is left. The peak (both columns under 2 GB now) is the node's idle 0.2 GB, the two
classic models' stubs and tritonserver 0.16 GB, and the job's regions, kept for the next job:
the CT (524 MB), ct-body's labels (262 MB, which are the BODY structure's mask), its body as
bits for ct-lungs (33 MB) and the lungs' bits (66 MB). The first study after a start is at
the 15 s goal, not under it in every run: it still pays for memory touched for the first
time (the host, a Firecracker VM, backs guest memory on first touch), in the models' stubs
(ct-body 2.2 s against 1.7 s), in the encoders (about 160 MB of working arrays: 2.4 s against
0.9 s) and in the first C-STORE to Orthanc; the 2 s of the quiet period are the default
rule's (complete on release removes them). The repeated head CT holds one patient per 140
slices: ct-body keeps the largest one.

After a large study the node's processes hold about 1.3 GB more while idle (the second
column's "before the send"): the client's regions (the CT, the labels), kept for
`inference.shared_memory_keep_s` (120 s) after their last job, then freed; the Python
backend's pools no longer grow with the volume."""


def _one_study(node: Any, orthanc: Any, batch: list[Path]) -> dict[str, Any]:
    """Send one study, wait for its three objects in Orthanc; memory sampled meanwhile."""
    study_uid = pydicom.dcmread(batch[0], stop_before_pixels=True).StudyInstanceUID
    idle_pss, idle_rss, idle_names = _memory_mb(node.process.pid)
    sampler = Sampler(node.process.pid)
    sampler.start()
    send_s, latency_s = send_and_wait(node, orthanc, batch, timeout_s=900, poll_s=0.1)
    sampler.stop.set()
    sampler.join()
    job = next(j for j in node.get(f"/api/jobs?study={study_uid}"))
    return {
        "send_s": send_s,
        "latency_s": latency_s,
        "idle_pss": idle_pss,
        "idle_rss": idle_rss,
        "idle_by": sorted(idle_names.items(), key=lambda kv: -kv[1])[:3],
        "peak_pss": sampler.peak_pss,
        "peak_rss": sampler.peak_rss,
        "at_peak": sorted(sampler.at_peak.items(), key=lambda kv: -kv[1])[:5],
        "timings": job["timings"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument(
        "--rounds", type=int, default=2, help="studies one after another (the first: cold)"
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-large-"))
    orthanc = start_orthanc(tmp / "orthanc")
    node = start_node(tmp / "node", orthanc, router={"quiet_period_s": 2.0})
    results = []
    try:
        time.sleep(3)
        for r in range(args.rounds):
            batch = fresh_copy(head_ct_files(), tmp / f"ct{r}", count=args.slices)
            time.sleep(2)  # the copy's writes settle before the timed send
            results.append(_one_study(node, orthanc, batch))
            print(f"round {r}: {results[-1]['latency_s']:.1f} s", flush=True)
    finally:
        stop_process(node.process)
        stop_process(orthanc.process)
        shutil.rmtree(tmp, ignore_errors=True)

    def goal(value: float, limit: float) -> str:
        return "met" if value <= limit else "not met"

    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    names = ["first study after the node starts"] + [
        f"study {n + 1}" for n in range(1, len(results))
    ]
    stages = [k for k, v in results[0]["timings"].items() if k.endswith("_s")]
    table = "\n".join(
        [
            row("measure", names),
            row("---", ["---"] * len(results)),
            row("sending the instances (storescu)", [f"{x['send_s']:.1f} s" for x in results]),
            row(
                "**last C-STORE response -> 3 objects in Orthanc** (goal <= 15 s)",
                [f"**{x['latency_s']:.1f} s** ({goal(x['latency_s'], 15)})" for x in results],
            ),
            row(
                "before the send, all node processes: PSS / RSS",
                [f"{x['idle_pss']:.0f} MB / {x['idle_rss']:.0f} MB" for x in results],
            ),
            row(
                "before the send, by process (PSS)",
                [", ".join(f"{n} {v:.0f} MB" for n, v in x["idle_by"]) for x in results],
            ),
            row(
                "**peak, all node processes: PSS** (goal <= 2048 MB)",
                [f"**{x['peak_pss']:.0f} MB** ({goal(x['peak_pss'], 2048)})" for x in results],
            ),
            row(
                "peak RSS (shared pages counted in each process)",
                [f"{x['peak_rss']:.0f} MB" for x in results],
            ),
            row(
                "at the peak, by process (PSS)",
                [", ".join(f"{n} {v:.0f} MB" for n, v in x["at_peak"]) for x in results],
            ),
            *(
                row(f"job: {k}", [f"{float(x['timings'].get(k, 0.0)):.2f}" for x in results])
                for k in stages
            ),
        ]
    )
    body = f"""
A {args.slices}-slice 512x512 CT (the shared head CT repeated along z, fresh UIDs) sent with
storescu on one association to a node running the default rule (ct-body + ct-lungs; SEG, SR
and RTSTRUCT to Orthanc; the default 2 s quiet period) with its local tritonserver, then again
as a new study ({args.rounds} in all, one after another). Memory of the node and every process
under it (receiver workers, tritonserver, its Python backend stubs), sampled every 0.1 s.

{table}

{NOTES}
"""
    record(f"A {args.slices:,}-slice CT through the whole path: memory and time", body)
    print(body)


if __name__ == "__main__":
    main()
