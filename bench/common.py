"""Shared benchmark helpers: fresh copies of the shared CT, machine description, results file."""

from __future__ import annotations

import platform
import re
import statistics
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks.md"


def fresh_copy(files: list[Path], out: Path, copies: int = 1) -> list[Path]:
    """The series with new Study/Series/SOP UIDs (``copies`` times, shifted along z), so that
    every round stores new instances rather than duplicates."""
    out.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    written = []
    datasets = [pydicom.dcmread(f) for f in files]
    for c in range(copies):
        series = generate_uid()
        for n, ds in enumerate(datasets):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = out / f"c{c}_{n:04d}.dcm"
            ds.save_as(path)
            written.append(path)
    return written


def machine() -> str:
    cpu = "unknown CPU"
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"model name\s*:\s*(.+)", text)
        cpu = match.group(1).strip() if match else cpu
        cores = text.count("processor\t:")
    except OSError:
        cores = 0
    return f"{platform.machine()}, {cores} cores, {cpu}, Python {platform.python_version()}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def record(section: str, body: str) -> None:
    """Replace (or append) ``## section`` in docs/benchmarks.md."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = f"## {section}\n\n_Recorded {stamp} on {machine()}._\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    )
    RESULTS.write_text(text)
