"""DIMSE query/retrieve of the archive with DCMTK as the planning system or PACS: findscu at
every level (study root and patient root), movescu to Orthanc (a configured DICOM
destination) and getscu back on the association, for a study the node processed itself (the
shipped body and lung models on its own Triton: SEG, SR and RTSTRUCT). A C-MOVE to an AE the
node does not know is refused with 0xA801; a calling AE not allowed to query gets 0x0124."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from tests.peers import (
    NodeProcess,
    Orthanc,
    start_node,
    start_orthanc,
    stop_process,
    storescu,
    wait_for,
)
from tests.phantoms import chest_phantom, write_ct_series

pytestmark = pytest.mark.integration
ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian DCMTK stalls 40 ms a message without it
ALLOWED = ["FINDSCU", "MOVESCU", "GETSCU"]  # DCMTK's own calling AE titles


@pytest.fixture(scope="module")
def archive(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[NodeProcess, Orthanc, str, Path]]:
    tmp = tmp_path_factory.mktemp("qr")
    orthanc = start_orthanc(tmp / "orthanc")
    rules = tmp / "rules"
    rules.mkdir()
    rule = {
        "name": "contours",
        "match": {"Modality": "CT"},
        "select": {"orientation": "axial", "min_instances": 5},
        "models": ["ct-body", "ct-lungs"],
        "outputs": ["SEG", "SR", "RTSTRUCT"],
    }  # no destination: the results stay in the archive, to be pulled
    (rules / "r.yaml").write_text(yaml.safe_dump({"rules": [rule]}))
    node = start_node(
        tmp / "node",
        orthanc,  # "pacs": Orthanc's AE, the one C-MOVE may send to
        router={"rules_dir": str(rules), "quiet_period_s": 0.5},
        scp={"query_retrieve": {"allowed_calling_ae_titles": ALLOWED}},
    )
    p = chest_phantom(slices=24, size=96)
    study, files = write_ct_series(p.hu, p.affine, tmp / "ct", patient_id="QR-1",
                                   patient_name="Query^Rita")  # fmt: skip
    assert storescu(node.dimse_port, files).returncode == 0
    wait_for(
        lambda: any(j["state"] == "done" for j in node.get(f"/api/jobs?study={study}") or []),
        240,
        "the job",
    )
    yield node, orthanc, study, tmp
    stop_process(node.process)
    stop_process(orthanc.process)
    assert "Traceback" not in node.log_text()


def _dcmtk(tool: str, node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    command = [tool, "-aec", node.ae_title, *args, "127.0.0.1", str(node.dimse_port)]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip


def _find(node: NodeProcess, out: Path, model: str, *keys: str) -> list[pydicom.Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [model, "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = _dcmtk("findscu", node, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _series(node: NodeProcess, out: Path, study: str) -> dict[str, Any]:
    answers = _find(node, out, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}",
                    "SeriesInstanceUID", "Modality", "SeriesDescription",
                    "NumberOfSeriesRelatedInstances")  # fmt: skip
    return {str(a.Modality): a for a in answers}


def test_findscu_at_every_level(archive: tuple[NodeProcess, Orthanc, str, Path]) -> None:
    node, _, study, tmp = archive
    out = tmp / "find"
    studies = _find(node, out, "-S", "QueryRetrieveLevel=STUDY", "PatientID=QR-1",
                    "StudyInstanceUID", "PatientName", "ModalitiesInStudy",
                    "NumberOfStudyRelatedInstances")  # fmt: skip
    assert [str(a.StudyInstanceUID) for a in studies] == [study]
    assert str(studies[0].PatientName) == "Query^Rita"
    assert set(studies[0].ModalitiesInStudy) == {"CT", "SEG", "SR", "RTSTRUCT"}
    assert int(studies[0].NumberOfStudyRelatedInstances) == 24 + 3
    assert studies[0].RetrieveAETitle == node.ae_title
    wildcard = _find(node, out, "-S", "QueryRetrieveLevel=STUDY", "PatientName=query*",
                     "StudyInstanceUID")  # fmt: skip
    assert [str(a.StudyInstanceUID) for a in wildcard] == [study]
    assert _find(node, out, "-S", "QueryRetrieveLevel=STUDY", "PatientID=nobody") == []

    series = _series(node, out, study)
    assert set(series) == {"CT", "SEG", "SR", "RTSTRUCT"}
    assert int(series["CT"].NumberOfSeriesRelatedInstances) == 24
    assert str(series["SEG"].SeriesDescription) == "AI segmentation"
    images = _find(node, out, "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}",
                   f"SeriesInstanceUID={series['RTSTRUCT'].SeriesInstanceUID}", "SOPInstanceUID",
                   "SOPClassUID")  # fmt: skip
    assert [a.SOPClassUID for a in images] == ["1.2.840.10008.5.1.4.1.1.481.3"]

    patients = _find(node, out, "-P", "QueryRetrieveLevel=PATIENT", "PatientID=QR-1",
                     "PatientName", "NumberOfPatientRelatedStudies")  # fmt: skip
    assert [(str(a.PatientID), int(a.NumberOfPatientRelatedStudies)) for a in patients] == [
        ("QR-1", 1)
    ]
    # a value the attribute cannot hold: a failure status with the reason, not a crash
    bad = _dcmtk("findscu", node, "-v", "-S", "-k", "QueryRetrieveLevel=STUDY",
                 "-k", "StudyDate=yesterday")  # fmt: skip
    text = (bad.stdout + bad.stderr).lower()
    assert "unabletoprocess" in text or "0xc000" in text, text
    # PATIENT is no level of the study root model; a calling AE not allowed is refused
    wrong = _dcmtk(
        "findscu", node, "-v", "-S", "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID"
    )
    assert "datasetdoesnotmatchsopclass" in (wrong.stdout + wrong.stderr).lower()  # 0xA900
    refused = _dcmtk("findscu", node, "-v", "-aet", "EVE", "-S", "-k", "QueryRetrieveLevel=STUDY",
                     "-k", "StudyInstanceUID")  # fmt: skip
    assert "0x124" in (refused.stdout + refused.stderr).lower()  # Refused: Not Authorized


def test_movescu_sends_results_to_a_configured_node_and_unknown_is_refused(
    archive: tuple[NodeProcess, Orthanc, str, Path],
) -> None:
    node, orthanc, study, tmp = archive
    series = _series(node, tmp / "find-move", study)
    moved = _dcmtk("movescu", node, "-S", "-aem", orthanc.aet, "-k", "QueryRetrieveLevel=SERIES",
                   "-k", f"StudyInstanceUID={study}",
                   "-k", f"SeriesInstanceUID={series['SEG'].SeriesInstanceUID}")  # fmt: skip
    assert moved.returncode == 0, moved.stdout + moved.stderr
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {}})
    assert len(found) == 1  # the series asked for, nothing else
    tags = orthanc.get(f"/instances/{found[0]}/simplified-tags")
    assert tags["SeriesInstanceUID"] == str(series["SEG"].SeriesInstanceUID)

    whole = _dcmtk("movescu", node, "-S", "-aem", orthanc.aet, "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyInstanceUID={study}")  # fmt: skip
    assert whole.returncode == 0, whole.stdout + whole.stderr
    stored = orthanc.post(
        "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study}}
    )
    assert len(stored) == 24 + 3

    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    unknown = _dcmtk("movescu", node, "-v", "-S", "-aem", "NOWHERE", *keys)
    text = (unknown.stdout + unknown.stderr).lower()
    assert "refused: movedestinationunknown" in text, text  # 0xA801


def test_getscu_retrieves_seg_sr_and_rtstruct(
    archive: tuple[NodeProcess, Orthanc, str, Path],
) -> None:
    node, _, study, tmp = archive
    series = _series(node, tmp / "find-get", study)
    for modality, sop_class in (
        ("SEG", "1.2.840.10008.5.1.4.1.1.66.4"),
        ("SR", "1.2.840.10008.5.1.4.1.1.88.34"),
        ("RTSTRUCT", "1.2.840.10008.5.1.4.1.1.481.3"),
    ):
        out = tmp / f"get-{modality}"
        out.mkdir()
        got = _dcmtk("getscu", node, "-S", "-od", str(out), "-k", "QueryRetrieveLevel=SERIES",
                     "-k", f"StudyInstanceUID={study}",
                     "-k", f"SeriesInstanceUID={series[modality].SeriesInstanceUID}")  # fmt: skip
        assert got.returncode == 0, got.stdout + got.stderr
        files = list(out.iterdir())
        assert len(files) == 1, (modality, got.stdout + got.stderr)
        ds = pydicom.dcmread(files[0])
        assert ds.SOPClassUID == sop_class and ds.StudyInstanceUID == study


def test_orthanc_pulls_the_results_over_dicomweb(
    archive: tuple[NodeProcess, Orthanc, str, Path],
) -> None:
    """Orthanc's DICOMweb plugin with the node as its remote server: it finds the study's
    SEG, SR and RTSTRUCT series through the node's QIDO-RS and retrieves them by WADO-RS."""
    node, _, study, tmp = archive
    pacs = start_orthanc(
        tmp / "orthanc-dicomweb",
        extra={
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {"airouter": [f"{node.url}/dicomweb/"]},
            }
        },
    )
    try:
        found = pacs.post(
            "/dicom-web/servers/airouter/qido",
            {"Uri": f"/studies/{study}/series", "Arguments": {"Modality": "SEG\\SR\\RTSTRUCT"}},
        )
        series = {r["00080060"]["Value"]: r["0020000E"]["Value"] for r in found}
        assert set(series) == {"SEG", "SR", "RTSTRUCT"}
        resources = [{"Study": study, "Series": uid} for uid in series.values()]
        pacs.post("/dicom-web/servers/airouter/retrieve", {"Resources": resources})
        stored = pacs.post("/tools/find", {"Level": "Series", "Query": {}, "Expand": True})
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in stored)
        assert modalities == ["RTSTRUCT", "SEG", "SR"]
    finally:
        stop_process(pacs.process)
