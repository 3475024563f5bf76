"""Who pays: owners and families, envelopes, the stable matching of claims to envelopes, GPU-hour
metering, and cover for a new claim (SPEC §B.4-§B.5, DESIGN decisions 1 and 9).

This package must never know where work runs: slots, nodes and placement are not its concern.
"""

from gpu_fleet.core.funding.cover import (
    Attempt,
    CoverFailure,
    CoverPlan,
    CoverReason,
    CoverRequest,
    Segment,
    available_width,
    cover,
    owner_of_run,
)
from gpu_fleet.core.funding.envelopes import (
    CapInfo,
    EnvelopeIndex,
    EnvelopeInfo,
    build_index,
    location_of,
)
from gpu_fleet.core.funding.family import BindingConflict, ConflictKind, Family, Tier, derive_family
from gpu_fleet.core.funding.fill_result import Accepted, FillResult, Rejection
from gpu_fleet.core.funding.matching import (
    HOURS_EPSILON,
    LOAN,
    SPONSOR,
    HoursView,
    fill,
    senior_width,
)
from gpu_fleet.core.funding.metering import (
    CapUsage,
    EnvelopeUsage,
    Evaluation,
    FundingInputs,
    Meter,
    RunFunding,
    advance_meter,
    evaluate,
    summarize,
)
from gpu_fleet.core.funding.proposals import Proposer

__all__ = [
    "HOURS_EPSILON",
    "LOAN",
    "SPONSOR",
    "Accepted",
    "Attempt",
    "BindingConflict",
    "CapInfo",
    "CapUsage",
    "ConflictKind",
    "CoverFailure",
    "CoverPlan",
    "CoverReason",
    "CoverRequest",
    "EnvelopeIndex",
    "EnvelopeInfo",
    "EnvelopeUsage",
    "Evaluation",
    "Family",
    "FillResult",
    "FundingInputs",
    "HoursView",
    "Meter",
    "Proposer",
    "Rejection",
    "RunFunding",
    "Segment",
    "Tier",
    "advance_meter",
    "available_width",
    "build_index",
    "cover",
    "derive_family",
    "evaluate",
    "fill",
    "location_of",
    "owner_of_run",
    "senior_width",
    "summarize",
]
