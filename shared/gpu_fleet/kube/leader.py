"""Leader election over a ``coordination.k8s.io/v1`` Lease, as client-go's leaderelection does it.

With more than one replica of a bridge half, exactly one acts (informers, passes, writes); the
others stand by with their ledger follower warm.  The Lease records who holds it
(``holderIdentity``) and when it was last renewed; the holder renews every ``retry_seconds``.

* **Acquire**: a candidate takes the Lease when it does not exist (create; AlreadyExists means
  someone was faster), when nobody holds it (released), or when the holder has not renewed for
  ``lease_seconds``.  Expiry is judged by the candidate's *own* clock from the moment it last
  saw the record change (client-go's ``observedTime``), never by comparing the holder's
  timestamps with ours, so clock skew between nodes cannot hand the Lease to two holders.
* **Every write** is a merge patch guarded by the Lease's ``resourceVersion``: two candidates
  that both see an expired Lease cannot both win (one gets 409 Conflict).
* **Hold**: the holder renews; if it sees another holder, or cannot renew for
  ``renew_seconds`` (shorter than ``lease_seconds``, so it stops before anyone else may start),
  leadership is lost and ``hold`` returns - the bridge then exits, and its supervisor starts a
  fresh standby.  It never tries to win back a Lease it lost while still running.
* **Release** on a clean stop: ``holderIdentity`` is cleared, so a standby takes over at its
  next try instead of waiting for expiry.

Time comes from ``clock`` (seconds; tests pass a fake one), waits from ``sleep``.  Timestamps
written to the Lease are MicroTime (six fractional digits) in UTC.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from gpu_fleet.kube.client import (
    AlreadyExistsError,
    ApiStatusError,
    ConflictError,
    KubeClient,
    NotFoundError,
)
from gpu_fleet.kube.objects import LEASES, Obj, rv_of

log = structlog.get_logger("gpu_fleet.kube.leader")


@dataclass(frozen=True)
class LeaderSettings:
    namespace: str = "default"
    name: str = "gpu-fleet"  # the bridge appends its half: ``<name>-objects`` / ``-pods``
    identity: str = ""  # empty: hostname and process id
    lease_seconds: float = 15.0
    renew_seconds: float = 10.0
    retry_seconds: float = 2.0
    release_on_stop: bool = True
    clock: Callable[[], float] = field(default=time.time, compare=False)

    def problems(self) -> list[str]:
        """Field errors (empty when the settings are usable)."""
        out = []
        if self.lease_seconds <= 0:
            out.append("lease seconds: must be > 0")
        if not 0 < self.renew_seconds < self.lease_seconds:
            out.append("renew seconds: must be > 0 and below the lease seconds")
        if not 0 < self.retry_seconds < self.renew_seconds:
            out.append("retry seconds: must be > 0 and below the renew seconds")
        if not self.namespace:
            out.append("leader namespace: must not be empty")
        if not self.name:
            out.append("leader name: must not be empty")
        return out


def micro_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        client: KubeClient,
        settings: LeaderSettings,
        name: str,
        identity: str,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.settings = settings
        self.name = name
        self.identity = identity
        self.sleep = sleep
        self.leading = False
        self.attempts = 0
        self.holder = ""  # the holder last seen
        self._observed: tuple[Any, ...] | None = None  # the record last seen
        self._observed_at = 0.0  # our clock when it last changed

    def _now(self) -> float:
        return self.settings.clock()

    def _record(self, lease: Obj) -> tuple[Any, ...]:
        spec = lease.get("spec") or {}
        return (
            spec.get("holderIdentity") or "",
            spec.get("renewTime"),
            spec.get("acquireTime"),
            spec.get("leaseTransitions"),
        )

    def _spec(self, now: float, acquire: str, transitions: int) -> Obj:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.settings.lease_seconds)),
            "acquireTime": acquire,
            "renewTime": micro_time(now),
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the Lease afterwards."""
        self.attempts += 1
        now = self._now()
        ns = self.settings.namespace
        try:
            lease = await self.client.get(LEASES, ns, self.name)
        except NotFoundError:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": ns},
                "spec": self._spec(now, micro_time(now), 0),
            }
            try:
                await self.client.create(LEASES, ns, body)
            except AlreadyExistsError:
                return False
            self.holder = self.identity
            return True
        record = self._record(lease)
        if record != self._observed:
            self._observed, self._observed_at = record, now
        holder = record[0]
        self.holder = holder
        spec = lease.get("spec") or {}
        duration = float(spec.get("leaseDurationSeconds") or self.settings.lease_seconds)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # held by someone alive
        mine = holder == self.identity
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if mine else 1)
        acquire = str(spec.get("acquireTime")) if mine else micro_time(now)
        patch = {
            "metadata": {"resourceVersion": rv_of(lease)},
            "spec": self._spec(now, acquire, transitions),
        }
        try:
            await self.client.patch(LEASES, ns, self.name, patch)
        except (ConflictError, NotFoundError):
            return False
        self.holder = self.identity
        return True

    async def acquire(self) -> None:
        """Wait until we hold the Lease."""
        while True:
            try:
                if await self.try_acquire_or_renew():
                    break
            except ApiStatusError as exc:
                log.warning("leader.try_failed", lease=self.name, error=str(exc))
            await self.sleep(self.settings.retry_seconds)
        self.leading = True
        log.info("leader.acquired", lease=self.name, identity=self.identity)

    async def hold(self) -> str:
        """Renew until leadership is lost; returns why."""
        last_renew = self._now()
        while True:
            await self.sleep(self.settings.retry_seconds)
            try:
                ok = await self.try_acquire_or_renew()
            except ApiStatusError as exc:
                log.warning("leader.renew_failed", lease=self.name, error=str(exc))
                ok = False
            now = self._now()
            if ok:
                last_renew = now
                continue
            if self.holder and self.holder != self.identity:
                why = f"lease {self.name} is held by {self.holder}"
                break
            if now - last_renew >= self.settings.renew_seconds:
                why = f"lease {self.name} not renewed for {now - last_renew:.1f}s"
                break
        self.leading = False
        log.error("leader.lost", lease=self.name, identity=self.identity, reason=why)
        return why

    async def release(self) -> None:
        """Give the Lease up (a clean stop), so a standby need not wait for it to expire."""
        if not self.leading:
            return
        self.leading = False
        try:
            lease = await self.client.get(LEASES, self.settings.namespace, self.name)
            if self._record(lease)[0] != self.identity:
                return
            patch = {
                "metadata": {"resourceVersion": rv_of(lease)},
                "spec": {"holderIdentity": None, "leaseDurationSeconds": 1},
            }
            await self.client.patch(LEASES, self.settings.namespace, self.name, patch)
            log.info("leader.released", lease=self.name, identity=self.identity)
        except ApiStatusError as exc:
            log.warning("leader.release_failed", lease=self.name, error=str(exc))
