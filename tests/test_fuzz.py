"""Hostile files: mutants of the shared odd and transfer-syntax files through C-STORE and
STOW-RS. Seeded and bounded: MUTANTS of them, in about a minute. Every answer is a status with
a reason, no 5xx, no unhandled exception in the node's log, and no file in the spool without
its index row."""

from __future__ import annotations

import http.client
import json
import random
import re
import sqlite3
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context

from airouter.core.vocab import StoreStatus
from tests.peers import ROOT, SHARED_DICOM, NodeProcess, free_port, start_node

pytestmark = pytest.mark.integration

MUTANTS = 1000
SEED = 20261201
_VR = re.compile(rb"(?<=[\x00-\xff]{4})(AE|AS|CS|DA|DS|IS|LO|OB|OW|PN|SH|SQ|TM|UI|UL|US|UN)")


def _sources() -> list[tuple[Path, int]]:
    """Files with a readable file meta, and where their data set starts."""
    files = sorted(
        p
        for d in ("odd", "ts-chest-ct-16-syntaxes", "ts-mr-9-syntaxes")
        for p in (SHARED_DICOM / d).rglob("*")
        if p.is_file()
    )
    found = []
    for path in files:
        try:
            if path.stat().st_size > 4 << 20:
                continue  # keep the corpus small in memory
            meta = read_file_meta_info(path)
            if "TransferSyntaxUID" not in meta or "MediaStorageSOPClassUID" not in meta:
                continue
            header = pydicom.dcmread(path, stop_before_pixels=True)
            if not header.get("SOPClassUID") or not header.get("SOPInstanceUID"):
                continue  # pynetdicom, our sender, could not form its C-STORE request
            data = path.read_bytes()
            start = data.find(b"DICM") + 4
            end = start
            while end + 8 <= len(data) and data[end : end + 2] == b"\x02\x00":
                vr = data[end + 4 : end + 6]
                if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
                    end += 12 + int.from_bytes(data[end + 8 : end + 12], "little")
                else:
                    end += 8 + int.from_bytes(data[end + 6 : end + 8], "little")
            found.append((path, end))
        except Exception:
            continue
    return found


def _mutate(data: bytes, start: int, rng: random.Random) -> bytes:
    """One mutation of the data set part (the file meta stays, so the sender can send it)."""
    body = bytearray(data[start:])
    if not body:
        return data
    kind = rng.choice(["flip", "flip", "truncate", "length", "vr"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        body = body[: rng.randrange(len(body))]
    elif kind == "length":
        at = rng.randrange(0, max(1, len(body) - 4)) & ~1
        body[at : at + 4] = rng.choice(
            [b"\xff\xff\xff\xff", b"\xf0\xff\xff\x7f", b"\x07\x00\x00\x00"]
        )
    else:
        hits = [m.start() for m in _VR.finditer(bytes(body[:4096]))]
        if hits:
            at = rng.choice(hits)
            body[at : at + 2] = rng.choice([b"ZZ", b"QQ", b"\x00\x00"])
    return data[:start] + bytes(body)


def _corpus(tmp: Path) -> list[tuple[Path, str, str]]:
    rng = random.Random(SEED)
    tmp.mkdir(parents=True, exist_ok=True)
    sources = _sources()
    assert len(sources) >= 50, "the shared corpus is missing"
    out = []
    for n in range(MUTANTS):
        path, start = sources[n % len(sources)]
        meta = read_file_meta_info(path)
        target = tmp / f"m{n:04d}.dcm"
        target.write_bytes(_mutate(path.read_bytes(), start, rng))
        out.append((target, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    return out


def _c_store_all(node: NodeProcess, corpus: list[tuple[Path, str, str]]) -> tuple[list[str], int]:
    """Every mutant by C-STORE, each (SOP class, syntax) pair on the association that offers
    it; returns the problems seen and how many associations the node aborted (a message it
    cannot decode is answered by A-ABORT, the DIMSE-level answer; its log says why)."""
    problems, aborted = [], 0
    by_pair: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path, sop_class, ts in corpus:
        by_pair[(sop_class, ts)].append(path)
    pairs = sorted(by_pair)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        for first in range(0, len(pairs), 100):
            ae = AE(ae_title="FUZZER")
            # an aborted association is not waited on long; a slow answer (a busy machine) is
            # still an answer
            ae.dimse_timeout = 15
            group = pairs[first : first + 100]
            ae.requested_contexts = [build_context(c, [ts]) for c, ts in group]
            assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="AIROUTER")
            assert assoc.is_established
            try:
                for pair in group:
                    if not any(cx.abstract_syntax == pair[0] for cx in assoc.accepted_contexts):
                        continue
                    for path in by_pair[pair]:
                        if not assoc.is_established:
                            assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="AIROUTER")
                        try:
                            status = assoc.send_c_store(path)
                        except (ValueError, AttributeError, OSError):
                            continue  # the sender itself could not read it: not sent
                        code = status.get("Status") if status else None
                        if code is None and not assoc.is_established:
                            aborted += 1
                        elif code is None:
                            problems.append(f"{path.name}: no C-STORE response")
                        elif code != StoreStatus.SUCCESS and not status.get("ErrorComment"):
                            problems.append(f"{path.name}: status 0x{code:04X} without a reason")
            finally:
                if assoc.is_established:
                    assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return problems, aborted


def _stow_all(node: NodeProcess, corpus: list[tuple[Path, str, str]]) -> list[str]:
    problems = []
    for first in range(0, len(corpus), 50):
        body = (
            b"".join(
                b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n"
                for path, _, _ in corpus[first : first + 50]
            )
            + b"--XX--\r\n"
        )
        connection = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=120)
        connection.request(
            "POST",
            "/dicomweb/studies",
            body=body,
            headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'},
        )
        answer = connection.getresponse()
        text = answer.read()
        if answer.status not in (200, 202, 409):
            problems.append(f"STOW batch {first}: HTTP {answer.status} {text[:200]!r}")
            continue
        for item in json.loads(text).get("00081198", {}).get("Value", []):
            if not item.get("00000902", {}).get("Value"):
                problems.append(f"STOW batch {first}: a failure without a reason: {item}")
    return problems


def test_a_thousand_mutants_by_c_store_and_stow(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "mutants")
    models, rules = tmp_path / "models", tmp_path / "rules"
    models.mkdir()
    rules.mkdir()  # no rules: what is stored is not processed
    (models / "ct-body.yaml").write_text((ROOT / "config" / "models" / "ct-body.yaml").read_text())
    node = start_node(
        tmp_path / "node",
        None,
        wait_triton=False,
        inference={"triton_url": f"127.0.0.1:{free_port()}", "models_dir": str(models)},
        router={"rules_dir": str(rules)},
    )
    try:
        problems, aborted = _c_store_all(node, corpus)
        problems += _stow_all(node, corpus)
        assert node.get("/api/health")["status"] == "ok"
    finally:
        node.process.terminate()
        node.process.wait(timeout=30)
    assert problems == [], "\n".join(problems[:20])
    log = node.log_text()
    assert "Traceback" not in log, log[log.find("Traceback") - 500 : log.find("Traceback") + 3000]
    assert log.count("undecodable DIMSE message") >= aborted
    with sqlite3.connect(node.data_dir / "airouter.db") as db:
        indexed = {Path(p) for (p,) in db.execute("SELECT path FROM instances")}
    spooled = set((node.data_dir / "spool").rglob("*.dcm"))
    assert spooled <= indexed, sorted(spooled - indexed)[:5]
    assert not list((node.data_dir / "incoming").rglob("*.dcm"))
    assert len(indexed) > 50  # most mutants of a valid file are still stored
    for path in list(indexed)[:50]:
        pydicom.dcmread(path, stop_before_pixels=True, force=True)  # stored as received
