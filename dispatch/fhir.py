"""A job's results as FHIR R4: a transaction Bundle of one DiagnosticReport and an Observation
per measurement of its SR, built and validated with fhir.resources (R4B models).

- The report and each Observation carry an identifier made of the job, its version and the
  measurement; the Bundle creates or updates them by that identifier (conditional PUT), so a
  retry creates nothing twice and the final report replaces a preliminary one.
- The ImagingStudy is referenced by its Study Instance UID (``urn:dicom:uid`` identifier), the
  patient by Patient ID (with the Issuer of Patient ID as its system when the study has one).
- Status: ``final`` for a job done, ``preliminary`` while it waits for review or for a STAT
  finding sent before review, ``cancelled`` for a job failed, rejected or cancelled.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from airouter.core.vocab import Notify
from dispatch.report import Code, Group

# DICOM coding scheme designators -> FHIR code systems (PS3.16 Section 8, HL7 terminology)
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "SRT": "http://snomed.info/srt",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "FMA": "http://purl.org/sig/ont/fma",
    "RADLEX": "http://radlex.org",
    "NCIt": "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl",
}
STATUS = {
    Notify.DONE: "final",
    Notify.AWAITING_REVIEW: "preliminary",
    Notify.STAT_FINDING: "preliminary",
    Notify.FAILED: "cancelled",
    Notify.REJECTED: "cancelled",
    Notify.CANCELLED: "cancelled",
}
IMAGING_STUDY_CODE = {
    "system": "http://loinc.org",
    "code": "18748-4",
    "display": "Diagnostic imaging study",
}
RADIOLOGY = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "RAD",
    "display": "Radiology",
}
IMAGING = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
JOB_SYSTEM = "urn:airouter:job"


def coding(code: Code) -> dict[str, str]:
    """A DICOM coded concept as a FHIR Coding (an unknown scheme keeps its designator)."""
    system = SYSTEMS.get(code.scheme, f"urn:dicom:coding-scheme:{code.scheme}")
    return {"system": system, "code": code.value, "display": code.meaning}


def _uuid(*parts: object) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, '/'.join(map(str, parts)))}"


def report_bundle(
    *,
    event: Notify,
    job_id: int,
    version: int,
    study_uid: str,
    patient_id: str | None,
    patient_id_system: str,
    issued: str,
    groups: list[Group],
    conclusion: str,
    device: str,
) -> dict[str, Any]:
    """The transaction Bundle (as JSON) for one notification of a job; every resource is
    validated by its fhir.resources model on the way (a ValueError names what is wrong)."""
    status = STATUS[event]
    report_id = f"{job_id}.{version}"
    study = {
        "type": "ImagingStudy",
        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"},
    }
    subject = None
    if patient_id:
        subject = {
            "type": "Patient",
            "identifier": {"system": patient_id_system, "value": patient_id},
        }
    entries: list[dict[str, Any]] = []
    results = []
    observation_status = "final" if status == "final" else "preliminary"
    if status == "cancelled":
        groups = []  # nothing measured stands
    for index, group in enumerate(groups, start=1):
        for m in group.measurements:
            what = [m.name.meaning] + ([m.derivation.meaning] if m.derivation else [])
            # a structure's groups share its tracking UID (a prior's comparison, planar ones)
            key = (
                f"{report_id}/{index}/{group.tracking_uid or group.tracking_identifier}/"
                + "/".join(f"{c.scheme}-{c.value}" for c in (m.name, m.derivation) if c is not None)
            )
            observation: dict[str, Any] = {
                "resourceType": "Observation",
                "identifier": [{"system": f"{JOB_SYSTEM}:measurement", "value": key}],
                "status": observation_status,
                "category": [{"coding": [IMAGING]}],
                "code": {
                    "coding": [coding(m.name)],
                    "text": f"{group.tracking_identifier or '?'}: {', '.join(what)}",
                },
                "derivedFrom": [study],
                "device": {"display": device},
                "valueQuantity": {
                    "value": m.value,
                    "unit": m.unit.meaning or m.unit.value,
                    "system": SYSTEMS["UCUM"],
                    "code": m.unit.value,
                },
            }
            # the structure: its finding site's code where the SR has one, its name always
            site: dict[str, Any] = {"text": group.tracking_identifier or "?"}
            if group.finding_site is not None:
                site["coding"] = [coding(group.finding_site)]
            observation["bodySite"] = site
            if subject is not None:
                observation["subject"] = subject
            full = _uuid(JOB_SYSTEM, key)
            entries.append(_entry(full, Observation.model_validate(observation), key))
            results.append({"reference": full})
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": JOB_SYSTEM, "value": report_id}],
        "status": status,
        "category": [{"coding": [RADIOLOGY]}],
        "code": {"coding": [IMAGING_STUDY_CODE], "text": "AI analysis"},
        "issued": issued,
        "imagingStudy": [study],
        "conclusion": conclusion,
    }
    if subject is not None:
        report["subject"] = subject
    if results:
        report["result"] = results
    full = _uuid(JOB_SYSTEM, report_id)
    entries.insert(0, _entry(full, DiagnosticReport.model_validate(report), report_id))
    bundle = Bundle.model_validate(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    )
    return dict(bundle.model_dump(mode="json", exclude_none=True))


def _entry(full_url: str, resource: Observation | DiagnosticReport, key: str) -> dict[str, Any]:
    kind = resource.get_resource_type()
    system = JOB_SYSTEM if kind == "DiagnosticReport" else f"{JOB_SYSTEM}:measurement"
    return {
        "fullUrl": full_url,
        "resource": resource.model_dump(mode="json", exclude_none=True),
        "request": {"method": "PUT", "url": f"{kind}?identifier={quote(f'{system}|{key}')}"},
    }
