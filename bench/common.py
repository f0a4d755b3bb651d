"""Shared benchmark helpers: fresh copies of the shared CT, machine description, results file."""

from __future__ import annotations

import platform
import re
import statistics
from datetime import UTC, datetime
from pathlib import Path

from tests.peers import fresh_copy  # noqa: F401 - shared with the tests

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks.md"


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
