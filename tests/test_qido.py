"""QIDO-RS at every level (PS3.18 10.6) over the real index: two studies of real DICOM (the
shared head CT and GE EPI MR) with known patient, date and accession values, stored through
STOW-RS; every level, matching, paging, includefield, the Warning header and the 400s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.peers import MR_EPI, fresh_copy, head_ct_files
from tests.test_stow import Api

PATIENT_NAME, PATIENT_ID, ACCESSION, STUDY_DATE, STUDY_TIME = (
    "00100010",
    "00100020",
    "00080050",
    "00080020",
    "00080030",
)
SERIES_UID, MODALITY, SOP_UID, SOP_CLASS = "0020000E", "00080060", "00080018", "00080016"
STUDY_UID = "0020000D"


def _values(rows: list[dict[str, Any]], tag: str) -> list[Any]:
    out = []
    for row in rows:
        value = row.get(tag, {}).get("Value", [None])[0]
        out.append(value["Alphabetic"] if isinstance(value, dict) else value)
    return out


def _copy(files: list[Path], out: Path, count: int, **tags: str) -> list[pydicom.Dataset]:
    written = []
    for path in fresh_copy(files, out, count):
        ds = pydicom.dcmread(path)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
        written.append(ds)
    return written


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Api, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("qido")
    api = Api(tmp)
    ct = _copy(
        head_ct_files(), tmp / "ct", 4,
        PatientName="Doe^Jane", PatientID="P1", AccessionNumber="A100",
        StudyDate="20240105", StudyTime="101500", StudyDescription="CT HEAD",
    )  # fmt: skip
    mr_files = sorted(MR_EPI.glob("*.dcm"))
    mr = _copy(
        mr_files, tmp / "mr", 3,
        PatientName="Roe^Richard", PatientID="P2", AccessionNumber="B200",
        StudyDate="20240320", StudyTime="083000", StudyDescription="MR BRAIN",
    )  # fmt: skip
    for ds in ct + mr:
        buffer = Path(tmp / "one.dcm")
        ds.save_as(buffer)
        answer = api.stow([("application/dicom", buffer.read_bytes())])
        assert answer.status_code == 200, answer.text
    return api, {"ct": ct, "mr": mr}


def _get(api: Api, path: str, status: int = 200) -> Any:
    answer = api.client.get(path)
    assert answer.status_code == status, (path, answer.text)
    return answer


def test_study_level_matching(archive: tuple[Api, dict[str, Any]]) -> None:
    api, data = archive
    ct_study, mr_study = data["ct"][0].StudyInstanceUID, data["mr"][0].StudyInstanceUID
    base = "/dicomweb/studies"

    def uids(query: str) -> set[str]:
        return set(_values(_get(api, f"{base}?{query}").json(), STUDY_UID))

    assert uids("") == {ct_study, mr_study}
    assert uids("PatientName=doe*") == {ct_study}  # wildcard, case-insensitive
    assert uids("PatientName=Roe^Richard") == {mr_study}
    assert uids("PatientName=R?e^*") == {mr_study}
    assert uids("PatientID=P2") == {mr_study}
    assert uids("00100020=P1") == {ct_study}  # a tag as the key
    assert uids("AccessionNumber=A100") == {ct_study}
    assert uids("StudyDate=20240101-20240131") == {ct_study}
    assert uids("StudyDate=-20240201") == {ct_study}
    assert uids("StudyDate=20240201-") == {mr_study}
    assert uids("StudyDate=20240320") == {mr_study}
    assert uids("StudyTime=0800-0900") == {mr_study}
    assert uids("StudyDescription=*HEAD") == {ct_study}
    assert uids("ModalitiesInStudy=MR") == {mr_study}
    assert uids("ModalitiesInStudy=CT\\MR") == {ct_study, mr_study}
    assert uids(f"StudyInstanceUID={ct_study},{mr_study}") == {ct_study, mr_study}
    assert uids(f"StudyInstanceUID={mr_study}&PatientID=P1") == set()  # keys AND together
    assert uids("PatientName=Nobody") == set()
    row = next(r for r in _get(api, f"{base}?PatientID=P1").json())
    assert row["00201206"]["Value"] == [1] and row["00201208"]["Value"] == [4]
    assert row["00080061"] == {"vr": "CS", "Value": ["CT"]}
    assert _values([row], PATIENT_NAME) == ["Doe^Jane"]


def test_paging_and_limits(archive: tuple[Api, dict[str, Any]]) -> None:
    api, _ = archive
    first = _get(api, "/dicomweb/studies?limit=1").json()
    second = _get(api, "/dicomweb/studies?limit=1&offset=1").json()
    assert len(first) == len(second) == 1
    assert _values(first, STUDY_UID) != _values(second, STUDY_UID)
    assert _get(api, "/dicomweb/studies?offset=2").json() == []
    instances = _get(api, "/dicomweb/instances?limit=5").json()
    rest = _get(api, "/dicomweb/instances?offset=5").json()
    assert len(instances) == 5 and len(rest) == 2
    assert not set(_values(instances, SOP_UID)) & set(_values(rest, SOP_UID))
    capped = _get(api, "/dicomweb/studies?limit=100000")
    assert "limit capped" in capped.headers["warning"]


def test_series_and_instance_levels(archive: tuple[Api, dict[str, Any]]) -> None:
    api, data = archive
    ct = data["ct"]
    study, series = ct[0].StudyInstanceUID, ct[0].SeriesInstanceUID
    everywhere = _get(api, "/dicomweb/series?Modality=CT").json()
    assert _values(everywhere, SERIES_UID) == [series]
    assert _values(everywhere, PATIENT_ID) == ["P1"]  # top level: the study's attributes too
    assert _values(_get(api, "/dicomweb/series?PatientID=P2").json(), MODALITY) == ["MR"]
    in_study = _get(api, f"/dicomweb/studies/{study}/series").json()
    assert _values(in_study, SERIES_UID) == [series] and PATIENT_NAME not in in_study[0]
    assert in_study[0]["00201209"]["Value"] == [4]
    included = _get(api, f"/dicomweb/studies/{study}/series?includefield=PatientName").json()
    assert _values(included, PATIENT_NAME) == ["Doe^Jane"]
    assert PATIENT_NAME in _get(api, f"/dicomweb/studies/{study}/series?includefield=all").json()[0]

    ct_class = str(ct[0].SOPClassUID)
    all_ct = _get(api, f"/dicomweb/instances?SOPClassUID={ct_class}").json()
    assert set(_values(all_ct, SOP_UID)) == {str(d.SOPInstanceUID) for d in ct}
    assert set(_values(all_ct, ACCESSION)) == {"A100"}
    of_study = _get(api, f"/dicomweb/studies/{study}/instances").json()
    assert len(of_study) == 4 and set(_values(of_study, MODALITY)) == {"CT"}
    number = int(ct[1].InstanceNumber)
    one = _get(
        api, f"/dicomweb/studies/{study}/series/{series}/instances?InstanceNumber={number}"
    ).json()
    assert _values(one, SOP_UID) == [str(ct[1].SOPInstanceUID)]
    assert _values(one, SOP_CLASS) == [ct_class]
    assert one[0]["00083002"]["Value"]  # the transfer syntax it is stored in
    by_uid = _get(api, f"/dicomweb/instances?SOPInstanceUID={ct[2].SOPInstanceUID}").json()
    assert len(by_uid) == 1 and _values(by_uid, STUDY_UID) == [study]


def test_unsupported_keys_warn_and_bad_queries_are_400(archive: tuple[Api, dict[str, Any]]) -> None:
    api, data = archive
    warned = _get(api, "/dicomweb/studies?ReferringPhysicianName=X&fuzzymatching=true")
    assert len(warned.json()) == 2  # the key is ignored, not a filter
    assert "ReferringPhysicianName" in warned.headers["warning"]
    assert "fuzzymatching" in warned.headers["warning"]
    assert warned.headers["warning"].startswith("299 ")
    # a series-level key on the study level is not a study filter either
    assert "Modality" in _get(api, "/dicomweb/studies?Modality=CT").headers["warning"]
    for query in (
        "Foo=1",
        "StudyDate=2024",
        "StudyDate=20240101-2024",
        "StudyDate=-",
        "limit=-1",
        "offset=abc",
        "StudyInstanceUID=1..2",
        "includefield=NotAnAttribute",
    ):
        answer = _get(api, f"/dicomweb/studies?{query}", 400).json()
        assert answer["status"] == 400 and answer["error"], query
    assert _get(api, "/dicomweb/instances?InstanceNumber=abc", 400).json()["error"]
    _get(api, "/dicomweb/studies/1.2.3.4.5/series", 404)
    _get(api, "/dicomweb/studies/not-a-uid/instances", 400)
    study = data["ct"][0].StudyInstanceUID
    _get(api, f"/dicomweb/studies/{study}/series/1.2.3/instances", 404)


def test_dicomweb_client_searches_a_running_node_at_every_level(tmp_path: Path) -> None:
    """dicomweb-client (the library viewers and scripts use) against the node as a process:
    studies, series and instances, at the top level and under a study, with its own
    matching, paging and includefield parameters."""
    from dicomweb_client.api import DICOMwebClient

    from tests.peers import start_node, stop_process, storescu, wait_for

    (tmp_path / "no-rules").mkdir()
    ct = _copy(head_ct_files(), tmp_path / "ct", 3, PatientID="QIDO-1", PatientName="Qi^Do")
    node = start_node(
        tmp_path / "node", None, wait_triton=False, router={"rules_dir": str(tmp_path / "no-rules")}
    )
    try:
        paths = sorted((tmp_path / "ct").rglob("*.dcm"))
        assert storescu(node.dimse_port, paths).returncode == 0
        client = DICOMwebClient(url=f"{node.url}/dicomweb")
        studies = wait_for(
            lambda: client.search_for_studies(search_filters={"PatientID": "QIDO-1"}),
            30,
            "the study",
        )
        study = str(ct[0].StudyInstanceUID)
        assert _values(studies, STUDY_UID) == [study]
        assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []
        series = client.search_for_series(study_instance_uid=study)
        assert _values(series, SERIES_UID) == [str(ct[0].SeriesInstanceUID)]
        top = client.search_for_series(search_filters={"Modality": "CT"}, fields=["PatientName"])
        assert _values(top, PATIENT_NAME) == ["Qi^Do"]
        instances = client.search_for_instances(
            study_instance_uid=study, series_instance_uid=str(ct[0].SeriesInstanceUID)
        )
        assert set(_values(instances, SOP_UID)) == {str(d.SOPInstanceUID) for d in ct}
        page = client.search_for_instances(study_instance_uid=study, limit=2, offset=1)
        assert len(page) == 2
        assert len(client.search_for_instances(limit=10)) == 3
    finally:
        stop_process(node.process)
    assert "Traceback" not in node.log_text()
