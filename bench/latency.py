"""End-to-end latency: last C-STORE response -> SEG + SR + RTSTRUCT in Orthanc.

The shared 140-slice CT (fresh UIDs each round) is sent with DCMTK storescu to a node running
the default rule with its local tritonserver; Orthanc is the PACS. The node's own job timings
split the wait into completion, volume build, inference, encoding and sending. The node's
default quiet period applies unless --quiet-period-s is given.

    .venv/bin/python -m bench.latency [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pydicom
import yaml

from airouter.core.settings import RouterSettings
from bench.common import ROOT, fresh_copy, median, record
from tests.peers import head_ct_files, start_node, start_orthanc, stop_process, storescu


def _objects_in_orthanc(orthanc, study_uid: str) -> int:  # type: ignore[no-untyped-def]
    found = orthanc.get(f"/dicom-web/studies/{study_uid}/series") or []
    modalities = {s.get("00080060", {}).get("Value", [None])[0] for s in found}
    return len(modalities & {"SEG", "SR", "RTSTRUCT"})


NOTES = """\
Issue 15: all but model compute was 5.30 s (an AMD EPYC host, same 2 cores), 2.49 s on an
Intel Xeon host after the encoders' work, 1.92 s after ct-lungs took ct-body's body, 1.96 s
after the volume build read uncompressed pixels straight from the files (those records took
the difference of two medians; these take the median of each round's own). Then completion
began to look as soon as the sender releases its association (0.24 -> 0.01 s; it polled every
0.25 s), and encoding with the garbage collector paused and the structures' bounding boxes
shared came to 0.12-0.19 s in the job (0.39 s). On 2026-12-03 that gave **0.68 s** at 07:15
UTC (goal met), and 1.01-1.07 s in five runs a few hours later on the same host, where the
masks, the encoding and the C-STORE to Orthanc each took about 1.5 times as long: the code
measured at 07:15 and the code recorded here, run one after the other, gave 1.03 s both. The
goal holds on a quiet machine and sits at its edge on a busy one. What is left, largest
first: the C-STORE of the three objects to Orthanc (0.2-0.3 s on one pynetdicom
association), the time between the stages and Orthanc's indexing as the bench sees it, the
volume build, the encoding. The node's first job after a start (the first round) pays the
one-off imports and caches of the libraries. In the issue's second session the models on
their block grid and the kept shared-memory regions (the volume built in one) brought both
models from 2.59 to 0.62 s and the whole from 3.69 to 1.59 s; not model compute stayed at
1.01 s (rounds 0.73-1.42: the volume build alone took 0.13-0.51 s from one round to the
next). In the third session the classic models took their tensors by reference to the
node's regions (no copy through the Python backend's memory): both models 0.62 -> 0.38 s,
not model compute 0.90 s, the whole 1.27 s. On 2026-12-07 (an Intel Xeon host) the code
recorded here gave 0.79 s not model compute, then 0.98 s (the table) within the hour, where
storescu's own send of the 140 instances went from 0.29 to 0.61 s: at the goal on a busy
host, under it on a quiet one; with the SR built from a stub of its tree, 0.89 s (the
table)."""


def send_and_wait(  # type: ignore[no-untyped-def]
    node, orthanc, batch: list[Path], timeout_s: float = 300.0, poll_s: float = 0.05
) -> tuple[float, float]:
    """Send ``batch`` with storescu, then wait for its study's SEG, SR and RTSTRUCT in
    Orthanc: (seconds sending, seconds from the last C-STORE response to the three)."""
    import pydicom

    study_uid = pydicom.dcmread(batch[0], stop_before_pixels=True).StudyInstanceUID
    t0 = time.perf_counter()
    sent = storescu(node.dimse_port, batch)
    t_last = time.perf_counter()
    assert sent.returncode == 0, sent.stderr
    while _objects_in_orthanc(orthanc, study_uid) < 3:
        if time.perf_counter() - t_last > timeout_s:
            raise TimeoutError("objects did not reach Orthanc")
        time.sleep(poll_s)
    return t_last - t0, time.perf_counter() - t_last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--quiet-period-s", type=float, default=None, help="default: the node's own default"
    )
    parser.add_argument(
        "--on-release",
        action="store_true",
        help="the default rule with complete_on_release: true (no quiet period)",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    orthanc = start_orthanc(tmp / "orthanc")
    quiet = RouterSettings().quiet_period_s if args.quiet_period_s is None else args.quiet_period_s
    router: dict[str, object] = {"quiet_period_s": quiet}
    if args.on_release:
        rules = yaml.safe_load((ROOT / "rules" / "ct-rt-planning.yaml").read_text())
        for rule in rules["rules"]:
            rule["complete_on_release"] = True
        (tmp / "rules").mkdir()
        (tmp / "rules" / "ct-rt-planning.yaml").write_text(yaml.safe_dump(rules))
        router["rules_dir"] = str(tmp / "rules")
    node = start_node(tmp / "node", orthanc, router=router)
    rows: list[dict[str, float]] = []
    try:
        for r in range(args.rounds):
            batch = fresh_copy(head_ct_files(), tmp / f"round{r}")
            send_s, latency_s = send_and_wait(node, orthanc, batch)
            study_uid = pydicom.dcmread(batch[0], stop_before_pixels=True).StudyInstanceUID
            job = next(j for j in node.get(f"/api/jobs?study={study_uid}"))
            timings = job["timings"]
            created = job["created_at"]
            row = {"send_s": send_s, "latency_s": latency_s, **timings}
            rows.append(row)
            print(f"round {r}: latency {row['latency_s']:.2f} s, {timings} (job created {created})")
    finally:
        stop_process(node.process)
        stop_process(orthanc.process)
        shutil.rmtree(tmp, ignore_errors=True)

    def m(key: str) -> float:
        return median([row.get(key, 0.0) for row in rows])

    stages = (
        "completion_wait_s",
        "queue_wait_s",
        "volume_s",
        "inference_s",
        "masks_s",
        "encode_s",
        "archive_s",
        "dispatch_s",
    )
    for row in rows:  # per round, then the median: not a difference of two medians
        row["beyond_models_s"] = row["latency_s"] - row.get("inference_s", 0.0)
        row["waiting_s"] = row["latency_s"] - sum(row.get(k, 0.0) for k in stages)
    waiting = m("waiting_s")
    completion = (
        "the rule completes the study on release (complete_on_release)"
        if args.on_release
        else f"quiet period {quiet:.1f} s"
    )
    beyond_models = m("beyond_models_s")
    goal = "goal <= 1 s: " + ("met" if beyond_models <= 1 else "not met")
    body = f"""
From the last C-STORE response (storescu, 140 x 512x512 CT, one association) until the SEG, SR
and RTSTRUCT are all queryable in Orthanc. Medians of {args.rounds} rounds (the first is the
node's first job: {rows[0]["latency_s"]:.2f} s, {rows[0]["beyond_models_s"]:.2f} s not model
compute; "not model compute" and "not accounted" are taken per round, then the median);
{completion}; local tritonserver (CPU) over HTTP with system shared memory
(the default for a local server).

| stage | median s |
|---|---|
| sending 140 instances (storescu, for reference) | {m("send_s"):.2f} |
| **last C-STORE response -> 3 objects in Orthanc** | **{m("latency_s"):.2f}** |
| of which not model compute (all but inference) | {beyond_models:.2f} ({goal}) |
| completion: last instance -> study complete, job queued | {m("completion_wait_s"):.2f} |
| queue: job queued -> a worker starts it | {m("queue_wait_s"):.2f} |
| not accounted below (reading the index, Orthanc indexing and polling) | {waiting:.2f} |
| volume build (read, sort, rescale 140 slices) | {m("volume_s"):.2f} |
| inference, both models (wall; ct-lungs waits for ct-body's body) | {m("inference_s"):.2f} |
| of which ct-body (its own request) | {m("ct-body_infer_s"):.2f} |
| of which ct-lungs (its own request) | {m("ct-lungs_infer_s"):.2f} |
| saving the models' masks with the job | {m("masks_s"):.2f} |
| encode SEG + SR + RTSTRUCT | {m("encode_s"):.2f} |
| write the 3 objects to the archive (durable) and queue deliveries | {m("archive_s"):.2f} |
| C-STORE of the 3 objects to Orthanc | {m("dispatch_s"):.2f} |

Inference includes moving the 140x512x512 int16 volume to Triton and the labels back through
shared memory (about 0.02 s; `bench/inference.py`). ct-lungs takes ct-body's body as an input
(its card's `input.uses`) and so runs after it; before, both ran at once on the 2 cores and
ct-lungs computed the same body again.

{NOTES}
"""
    title = "End-to-end latency: CT in, SEG + SR + RTSTRUCT in the PACS"
    record(title + (", complete on release" if args.on_release else ""), body)
    print(body)


if __name__ == "__main__":
    main()
