"""Two limits that keep one team or one client from taking the manager for itself (issue 12).

* **Objects per namespace** (``ApiLimits.max_objects_per_namespace``): every Run, Budget and
  NotificationChannel lives in the manager's memory and in every follower's fold, forever until
  deleted, so one namespace that creates without end slows every team.  Checked inside the
  command, at decision time, so two concurrent applies cannot both take the last place;
  updating an object that exists is always allowed, as is deleting.  Terminal runs count until
  deleted (like Kubernetes' ``count/`` quotas).
* **Pending requests per client** (``ApiLimits.max_pending_per_client``): the manager serves
  every request in its own task, so one connection sending without waiting for answers could
  queue unbounded work in front of everyone else.  A client is its reply inbox prefix
  (``_INBOX.<connection id>``: nats-py, nats.go and the CLI use one per connection); over the
  limit a request is answered at once with 429 ``unavailable``, which clients retry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.model import Manifest, NotificationChannel, Run
from gpu_fleet.messages import api
from gpu_fleet_manager.boundary import REQUEST, ApiError


def _exists(state: FleetState, manifest: Manifest) -> bool:
    if isinstance(manifest, Run):
        return manifest.key in state.runs
    if isinstance(manifest, NotificationChannel):
        return manifest.key in state.channels
    return manifest.key in state.budgets


def check_namespace_room(state: FleetState, manifests: Sequence[Manifest], limit: int) -> None:
    """Refuse (400, naming the limit) when the objects ``manifests`` create would put a
    namespace over ``limit`` objects; nothing of the request is applied then.  An object named
    twice in one apply counts once."""
    new = {
        (type(m).__name__, m.key): m.metadata.namespace for m in manifests if not _exists(state, m)
    }
    wanted = Counter(new.values())
    errors = []
    for namespace, count in sorted(wanted.items()):
        held = state.objects_in(namespace)
        if held + count > limit:
            errors.append(
                api.FieldErrorOut(
                    "documents",
                    f"namespace {namespace} holds {held} objects and this apply creates {count};"
                    f" the limit is {limit} objects per namespace (max_objects_per_namespace)",
                )
            )
    if errors:
        raise ApiError("validation", errors[0].message, errors)


def client_of(reply: str) -> str:
    """The client a reply subject belongs to: its inbox without the per-request token."""
    head, dot, _ = reply.rpartition(".")
    return head if dot and head.count(".") >= 1 else reply


class PendingPerClient:
    """Requests each client has waiting in the manager, bounded by ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending: Counter[str] = Counter()

    def enter(self, client: str) -> ApiError | None:
        """Count one more request of ``client``; the refusal when it has ``limit`` already."""
        if self.pending[client] >= self.limit:
            message = (
                f"this client has {self.pending[client]} requests waiting; the limit is"
                f" {self.limit} per client (max_pending_per_client): wait for answers, then retry"
            )
            return ApiError(
                "unavailable", message, [api.FieldErrorOut(REQUEST, message)], status="429"
            )
        self.pending[client] += 1
        return None

    def leave(self, client: str) -> None:
        self.pending[client] -= 1
        if self.pending[client] <= 0:
            del self.pending[client]
