"""The node's vocabularies, as enums: one definition each, used as column types and settings.

Text from outside (YAML, environment, HTTP, the database) becomes one of these where it enters
the program, so a typo fails at load time (STYLE.md, example 4). DIMSE and DICOMweb status
codes live here too: no handler spells a bare hex status. Imports nothing of the project.
"""

from __future__ import annotations

import enum

# -- the state store ----------------------------------------------------------------------


class StudyState(enum.StrEnum):
    """A study is receiving until completion declares it complete (and routes it)."""

    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(enum.StrEnum):
    """``queued -> running -> (waiting_inference) -> encoding -> (awaiting_review) ->
    dispatching -> done``, or an end with a reason: ``failed`` (retry makes a new version),
    ``cancelled`` or ``rejected`` (a reviewer's; nothing was sent)."""

    QUEUED = "queued"
    RUNNING = "running"
    WAITING_INFERENCE = "waiting_inference"  # Triton unavailable: retried, never failed for it
    ENCODING = "encoding"
    AWAITING_REVIEW = "awaiting_review"  # results archived; deliveries wait for a reviewer
    DISPATCHING = "dispatching"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def in_flight(self) -> bool:
        """Held by a worker: a node that dies leaves the job in one of these states."""
        return self in (JobState.RUNNING, JobState.WAITING_INFERENCE, JobState.ENCODING)

    @property
    def ended(self) -> bool:
        """Nothing more happens to the job unless someone retries it."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.REJECTED)


class Role(enum.StrEnum):
    """What a user of the HTTP server may do: each role may do what the ones below it may."""

    VIEWER = "viewer"  # read: the dashboard, the API's answers, DICOMweb, metrics
    OPERATOR = "operator"  # and act: retry, cancel, approve, send in (STOW-RS)
    ADMIN = "admin"  # and configure: users

    @property
    def rank(self) -> int:
        """Higher may do more."""
        return list(Role).index(self)

    def may(self, needed: Role) -> bool:
        """Whether this role may do what ``needed`` may."""
        return self.rank >= needed.rank


class DeliveryState(enum.StrEnum):
    """One (object, destination) of the outbox."""

    PENDING = "pending"
    SENDING = "sending"  # claimed by a node (its lease says which, and until when)
    SENT = "sent"
    FAILED = "failed"  # will be retried
    DEAD = "dead"  # gave up after the configured attempts
    AWAITING_REVIEW = "awaiting_review"  # held until a reviewer approves the job's results
    WITHHELD = "withheld"  # never sent: rejected by a reviewer, or replaced by a subset


class Notify(enum.StrEnum):
    """What a notification receiver is told about: a job that ended (``done``, ``failed``,
    ``rejected``, ``cancelled``), one whose results wait for a reviewer, and a STAT job's
    finding (sent as soon as its results are archived, before review and delivery)."""

    DONE = "done"
    FAILED = "failed"
    AWAITING_REVIEW = "awaiting_review"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    STAT_FINDING = "stat_finding"


class CommitmentState(enum.StrEnum):
    """Storage commitment of a delivery (PS3.4 J): recorded before the N-ACTION, then the
    destination's N-EVENT-REPORT says committed or failed."""

    PENDING = "pending"  # transaction recorded, C-STOREs under way
    REQUESTED = "requested"  # N-ACTION accepted, report awaited
    COMMITTED = "committed"
    FAILED = "failed"


class Review(enum.StrEnum):
    """Whether a rule's results wait for a person before they leave the node."""

    NONE = "none"
    REQUIRED = "required"


class RunMode(enum.StrEnum):
    """A rule's or a model's mode: ``shadow`` runs and archives, and sends only to
    destinations marked ``test: true`` (commissioning a model beside the clinical flow)."""

    CLINICAL = "clinical"
    SHADOW = "shadow"


class Source(enum.StrEnum):
    """How an instance reached the archive."""

    DIMSE = "dimse"
    STOW = "stow"
    PRODUCED = "produced"  # written by this node
    SPOOL = "spool"  # found in the spool without its index row, indexed at start


# -- rules and jobs -------------------------------------------------------------------------


class Priority(enum.StrEnum):
    """A rule's priority; jobs store its :attr:`rank` so the queue sorts by number."""

    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        """Higher runs first."""
        return {"stat": 300, "urgent": 200, "routine": 100}[self.value]


class Action(enum.StrEnum):
    """What a rule does with the series it selects (a job's action is RUN or FORWARD)."""

    RUN = "run"  # run the models, send their results
    FORWARD = "forward"  # send the selected series as received
    DISCARD = "discard"  # do nothing with the study (recorded)
    # not a rule's: compare a structure set sent back (approved, edited) with our result
    EVALUATE = "evaluate"


class OutputKind(enum.StrEnum):
    """The objects a job writes (ORIGINAL: a received instance a forwarding job sends)."""

    SEG = "SEG"
    SR = "SR"
    RTSTRUCT = "RTSTRUCT"
    PROBABILITY_MAP = "PROBABILITY_MAP"  # a FRACTIONAL SEG of the models' probabilities
    ORIGINAL = "ORIGINAL"

    @classmethod
    def produced(cls) -> tuple[OutputKind, ...]:
        """The kinds a rule or a model card may ask for."""
        return (cls.SEG, cls.SR, cls.RTSTRUCT, cls.PROBABILITY_MAP)


class SegType(enum.StrEnum):
    """The Segmentation Type of the SEG a rule asks for."""

    BINARY = "binary"  # one frame set per segment; segments may overlap
    LABELMAP = "labelmap"  # Label Map Segmentation: one frame set, labels mutually exclusive


class RTROIType(enum.StrEnum):
    """RT ROI Interpreted Type (PS3.3 C.8.8.8), the ones a model may declare."""

    EXTERNAL = "EXTERNAL"
    ORGAN = "ORGAN"
    AVOIDANCE = "AVOIDANCE"
    PTV = "PTV"
    CTV = "CTV"
    GTV = "GTV"


# -- settings ---------------------------------------------------------------------------------


class DeadlineAction(enum.StrEnum):
    """What a study that reaches its deadline while still receiving becomes."""

    ROUTE = "route"  # routed as it is
    DISCARD = "discard"  # failed without routing


class TritonProtocol(enum.StrEnum):
    """How the node talks to Triton."""

    HTTP = "http"
    GRPC = "grpc"


class SharedMemoryMode(enum.StrEnum):
    """System shared memory for tensors: ``auto`` uses it when Triton is on this host."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class ModelLoading(enum.StrEnum):
    """Which models the node's own tritonserver loads: ``in_use``, those the rules in force
    name (loaded when a reloaded rule names another, or a job needs one); ``all``, every
    model of the repositories."""

    IN_USE = "in_use"
    ALL = "all"


class Activation(enum.StrEnum):
    """A tensor model's output activation (card ``postprocessing.activation``)."""

    SOFTMAX = "softmax"  # argmax over channels (channel = label value)
    SIGMOID = "sigmoid"  # threshold each channel
    NONE = "none"


# -- DICOM statuses ---------------------------------------------------------------------------


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses (PS3.4 Table B.2-1)."""

    SUCCESS = 0x0000
    WARNING_COERCION = 0xB000  # stored, with data elements coerced
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_NOT_VALIDATED = 0xB007  # stored, the data set does not match the SOP class
    OUT_OF_RESOURCES = 0xA700  # refused: could not make the instance durable
    DATASET_MISMATCH = 0xA900  # error: data set does not match SOP class
    CANNOT_UNDERSTAND = 0xC210  # error: cannot understand (missing/invalid identifiers)
    PROCESSING_FAILURE = 0x0110

    @classmethod
    def stored(cls) -> frozenset[int]:
        """Statuses that mean the peer stored the instance (success and warnings)."""
        return frozenset(
            {
                cls.SUCCESS,
                cls.WARNING_COERCION,
                cls.WARNING_ELEMENTS_DISCARDED,
                cls.WARNING_NOT_VALIDATED,
            }
        )


class ServiceStatus(enum.IntEnum):
    """DIMSE-N statuses the node sends or reads (PS3.7 Annex C)."""

    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    NO_SUCH_SOP_CLASS = 0x0118


class FailureReason(enum.IntEnum):
    """Failure Reason (0008,1197) of STOW-RS responses (PS3.18 Table 10.5.3-2) and storage
    commitment reports (PS3.4 J.3.3)."""

    PROCESSING_FAILURE = 0x0110
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000


def status_text(code: int | None) -> str:
    """A status as DICOM people write it (``0xA700``), or ``none`` when there was no answer."""
    return "none" if code is None else f"0x{code:04X}"
