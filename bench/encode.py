"""Encoding speed: SEG + TID 1500 SR + RTSTRUCT for the 140-slice CT with 3 structures.

The body from the ct-body model plus two synthetic lung-like structures (one with a hole);
each encoder timed separately, including writing the object to bytes. Medians of --rounds.

    .venv/bin/python -m bench.encode [--rounds 5]
    .venv/bin/python -m bench.encode --multi-organ [--rounds 3]   # 500 slices, 20 structures
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Any

import highdicom as hd
import numpy as np

from airouter.core.gcpause import collection_paused
from airouter.core.settings import EncoderSettings
from airouter.core.vocab import OutputKind
from bench.common import median, record
from encoders.common import Provenance, SeriesIdentity, ensure_type2
from encoders.outputs import OutputRequest, SourceSeries, encode_outputs
from encoders.rtstruct import build_rtstruct
from encoders.seg import build_seg
from encoders.sr import build_measurement_report
from inference.algorithms import segment_body
from inference.cards import load_cards
from inference.volume import build_volume
from tests.objects import structure
from tests.peers import ROOT, head_ct_files

NOTES = (
    "Where the time goes now: each structure's bounding box is found once (its occupied "
    "slices from the mask as 64-bit words) and shared by the SEG, the SR and the RTSTRUCT; the "
    "BINARY SEG's frames, per-frame functional groups and source references are written by us "
    "(frames packed from the bounding box, the functional groups encoded once as explicit VR "
    "bytes; tests check it is the SEG highdicom writes), highdicom builds the rest; the "
    "RTSTRUCT's contours are traced by array marching squares over the bounding box (the same "
    "contours as scikit-image), its cells linked into closed paths by scipy's connected "
    "components and depth-first order, and every coordinate placed and written as DS text in "
    'array passes (byte-identical to "%.3f"), structures and slabs on both cores; the SR is '
    "highdicom's TID 1500 (the document built from its tree without the measurements, which go "
    "back in after), with the Image Library encoded as bytes. Python's "
    "cyclic garbage collector is paused while the pipeline encodes and archives (its full "
    "passes over every object the process holds took 0.3-0.8 s of the 500-slice case). Before "
    "issue 15's work (same machine, quiet) the three took SEG 0.72 s, SR 0.26 s, RTSTRUCT "
    "0.96 s."
)

MULTI_NOTES = """\
Issue 15: 52 s before its work, 41.1 s after the first part of it, 10.0 s after the SEG's
frames and functional groups were written by us, the RTSTRUCT traced by array marching squares
and only what the encoders read decoded from the headers after the first, 3.5 s after the
first profile-driven pass, and now as in the table: bounding boxes found once and shared,
contour cells linked through a per-cell table and walked by scipy's graph routines, the
coordinates formatted in array passes, the garbage collector paused. Where the rest goes
(one profiled round): tracing 20 structures over their bounding boxes (about 4 million cell
edges) about 0.8 s, the SR about 0.45 s (highdicom's TID 1500 with 20 groups: its content
tree is built and copied), the RTSTRUCT's formatting about 0.25 s, the SEG about 0.25 s and
writing the three objects about 0.3 s. Figures on this machine move up to 3x between runs.

On 2026-12-07, on an Intel Xeon host, the same code took 2.58 s (1.90 s was the AMD EPYC host
of the earlier record; the 140-slice case 0.27 s against 0.22 s). Each structure's contours,
and each structure's 16-slice slabs, then traced and written on the encoders' threads, one
per core (their array passes let the interpreter go; a thread for the whole RTSTRUCT beside
the SEG and SR gave 2.27-2.57 s, no better): 2.33-2.40 s. Then the SR: highdicom built the
document from the whole content tree, which it copied, parsed and searched for references
(0.26 s); it is now given the tree without its Imaging Measurements container, which goes
back in after, and the measurements' references are checked against the evidence by us (SR
0.50 -> 0.29 s): 2.00 s, the table (goal met, at its edge on this host). An hour later the
host was slower: that code and the reviewed one, alternating, 2.70-2.72 s and 2.48-2.77 s.
Where the rest goes (one timed round): the RTSTRUCT 1.1 s (tracing on both cores, of it
scipy's graph routines a third), the SEG 0.3 s, the SR 0.3 s, writing the three 0.3 s."""


def _as_the_pipeline(headers: list[Any], structures: list[Any]) -> float:
    """Seconds to build SEG + SR + RTSTRUCT through the encoders facade and write each to
    bytes, with the garbage collector paused as the pipeline has it while it encodes and
    archives."""
    t0 = time.perf_counter()
    with collection_paused():
        encoded = encode_outputs(
            request=OutputRequest(frozenset({OutputKind.SEG, OutputKind.SR, OutputKind.RTSTRUCT})),
            source=SourceSeries(headers),
            structures=structures,
            settings=EncoderSettings(),
            device_uid=hd.UID(),
        )
        for _, ds in encoded.objects:
            ds.save_as(io.BytesIO(), enforce_file_format=True)
    return time.perf_counter() - t0


def multi_organ(rounds: int) -> None:
    """SEG + SR + RTSTRUCT, as the pipeline builds them, for a 500-slice CT with 20
    structures (what a multi-organ model gives): the body and 19 ellipsoids of 30-120 mm."""
    import dataclasses
    import shutil
    import tempfile
    from pathlib import Path

    from bench.common import fresh_copy

    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    files = fresh_copy(head_ct_files(), tmp, count=500)
    volume = build_volume(files)
    ensure_type2(volume.datasets)
    cards = load_cards(ROOT / "config" / "models")
    card = cards["ct-lungs"]
    rng = np.random.default_rng(15)
    k, j, i = np.ogrid[: volume.hu.shape[0], : volume.hu.shape[1], : volume.hu.shape[2]]
    body = segment_body(volume.hu, volume.affine).astype(bool)
    structures = [structure(cards["ct-body"], cards["ct-body"].labels[0], body, volume_ml=1.0)]
    for n in range(19):
        ck, cj, ci = rng.uniform(40, 460), rng.uniform(120, 390), rng.uniform(120, 390)
        rk, rj, ri = rng.uniform(30, 120, size=3) / np.array([1.0, 0.45, 0.45])
        mask = ((k - ck) / rk) ** 2 + ((j - cj) / rj) ** 2 + ((i - ci) / ri) ** 2 <= 1
        s = structure(card, card.labels[n % 2], mask, volume_ml=1.0, intensities_hu=(0, 0, 0))
        spec = dataclasses.replace(s.spec, name=f"Organ_{n + 1:02d}", tracking_id=f"organ{n}")
        structures.append(dataclasses.replace(s, spec=spec))
    times = []
    for _ in range(rounds):
        headers = build_volume(files).datasets  # as a job has them: read, not yet decoded
        times.append(_as_the_pipeline(headers, structures))
        print(f"500 slices, 20 structures: {times[-1]:.2f} s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    value = median(times)
    body_text = f"""
SEG + TID 1500 SR + RTSTRUCT, as the pipeline builds them (encoders facade), for a 500-slice
512x512 CT (the head CT repeated along z) with 20 structures: the ct-body mask and 19
ellipsoids of 30-120 mm; each object written to bytes; {rounds} rounds, each from headers
freshly read (as a job has them).

| case | median s | per round |
|---|---|---|
| 500 slices, 20 structures | {value:.2f} | {", ".join(f"{x:.2f}" for x in times)} |

Goal: <= 2 s: {"met" if value <= 2.0 else "not met"}.

{MULTI_NOTES}
"""
    record("Encoding: SEG + SR + RTSTRUCT, 500 slices, 20 structures", body_text)
    print(body_text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--multi-organ", action="store_true", help="the 500-slice, 20-structure case"
    )
    args = parser.parse_args()
    if args.multi_organ:
        multi_organ(args.rounds)
        return
    volume = build_volume(head_ct_files())
    ensure_type2(volume.datasets)
    cards = load_cards(ROOT / "config" / "models")
    body = segment_body(volume.hu, volume.affine).astype(bool)
    k, j, i = np.ogrid[: body.shape[0], : body.shape[1], : body.shape[2]]
    right = ((j - 250) / 60.0) ** 2 + ((i - 200) / 40.0) ** 2 + ((k - 70) / 50.0) ** 2 <= 1
    left = ((j - 250) / 60.0) ** 2 + ((i - 320) / 40.0) ** 2 + ((k - 70) / 50.0) ** 2 <= 1
    left &= ~(((j - 250) / 20.0) ** 2 + ((i - 320) / 12.0) ** 2 <= 1)  # a hole
    lungs = cards["ct-lungs"]

    def measured(card: Any, label: Any, mask: np.ndarray) -> Any:
        hu = volume.hu[mask]
        stats = (float(hu.mean()), float(hu.min()), float(hu.max()))
        ml = float(mask.sum()) * volume.voxel_volume_ml
        return structure(card, label, mask, volume_ml=ml, intensities_hu=stats)

    structures = [
        measured(cards["ct-body"], cards["ct-body"].labels[0], body),
        measured(lungs, lungs.labels[0], right),
        measured(lungs, lungs.labels[1], left),
    ]
    provenance = Provenance("bench", "airouter", "0", "0")
    timings: dict[str, list[float]] = {
        "SEG": [],
        "SR": [],
        "RTSTRUCT": [],
        "all three, one after another": [],
        "all three as the pipeline builds them (encoders facade)": [],
    }

    def seg() -> Any:
        ds = build_seg(
            source_images=volume.datasets,
            structures=structures,
            provenance=provenance,
            series=SeriesIdentity(hd.UID(), 1, "s", hd.UID()),
        )
        ds.save_as(io.BytesIO())
        return ds

    def sr(seg_ds: Any) -> None:
        build_measurement_report(
            source_images=volume.datasets,
            seg=seg_ds,
            structures=structures,
            provenance=provenance,
            device_uid=hd.UID(),
            series=SeriesIdentity(hd.UID(), 2, "r", hd.UID()),
        ).save_as(io.BytesIO())

    def rtstruct() -> None:
        build_rtstruct(
            source_images=volume.datasets,
            structures=structures,
            provenance=provenance,
            series=SeriesIdentity(hd.UID(), 3, "t", hd.UID()),
        ).save_as(io.BytesIO(), enforce_file_format=True)

    for _ in range(args.rounds):
        t0 = time.perf_counter()
        seg_ds = seg()
        t1 = time.perf_counter()
        sr(seg_ds)
        t2 = time.perf_counter()
        rtstruct()
        t3 = time.perf_counter()
        for key, value in (
            ("SEG", t1 - t0),
            ("SR", t2 - t1),
            ("RTSTRUCT", t3 - t2),
            ("all three, one after another", t3 - t0),
        ):
            timings[key].append(value)
        headers = build_volume(head_ct_files()).datasets  # as a job has them: not yet decoded
        timings["all three as the pipeline builds them (encoders facade)"].append(
            _as_the_pipeline(headers, structures)
        )
        print({k: round(v[-1], 3) for k, v in timings.items()}, flush=True)
    rows = "\n".join(
        f"| {k} | {median(v):.2f} | {', '.join(f'{x:.2f}' for x in v)} |"
        for k, v in timings.items()
    )
    body_text = f"""
SEG (BINARY, 3 segments, empty frames omitted) + TID 1500 SR + RTSTRUCT for the 140-slice
512x512 head CT with 3 structures (the ct-body mask and two synthetic lung-shaped volumes,
one with a hole), each built and written to bytes; {args.rounds} rounds. The pipeline row
starts each round from freshly read headers, as a job does (their first decoding is part of
its time); the rows per object reuse one set of headers.

| object | median s | per round |
|---|---|---|
{rows}

{{GOAL}}
"""
    pipeline = median(timings["all three as the pipeline builds them (encoders facade)"])
    goal = (
        f"Goal: <= 0.5 s for all three: {'met' if pipeline <= 0.5 else 'not met'} "
        f"({pipeline:.2f} s as the pipeline builds them). {NOTES}"
    )
    body_text = body_text.replace("{GOAL}", goal)
    record("Encoding: SEG + SR + RTSTRUCT, 140 slices, 3 structures", body_text)
    print(body_text)


if __name__ == "__main__":
    main()
