"""A service that folds the ledger and answers requests about it (binder, forecaster).

Start: serve ``/healthz`` (``runtime.observe``), connect, make sure the stream exists, fold it
to the end, keep following it in a root task, then register the nats.micro endpoints and flush
so they answer as soon as ``start()`` returns.  Stop: stop taking requests; the actor base has
already cancelled the follower while the connection was still up; then drain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping

import nats.errors
import nats.micro
from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import Service

from gpu_fleet.core.ledger import Event, FleetState
from gpu_fleet.runtime.actor import Actor
from gpu_fleet.runtime.connect import connect, drain
from gpu_fleet.runtime.follower import LedgerFollower
from gpu_fleet.runtime.ledger_keys import LedgerKeys
from gpu_fleet.runtime.ledger_stream import LedgerStream
from gpu_fleet.runtime.observe import DEFAULT_MAX_LAG, Health, Observer, ledger_health

Handler = Callable[[Request], Awaitable[None]]


class FollowerService(Actor):
    service_name = "gpu-fleet-follower"  # nats.micro name, answered on $SRV.PING.<name>
    description = ""
    version = "0.0.0"
    group = "fleet"
    # Does the folded state charge GPU-hours (``FleetState.metered``)?  Only a follower that
    # answers funding questions needs it.
    metered = True

    def __init__(
        self,
        nats_url: str,
        *,
        metrics_port: int = 0,
        ready_max_lag: int = DEFAULT_MAX_LAG,
        ledger_keys: LedgerKeys | None = None,
    ) -> None:
        super().__init__()
        self.nats_url = nats_url
        self.ledger_keys = ledger_keys
        self.nc: Client | None = None
        self.ledger: LedgerStream | None = None
        self.follower: LedgerFollower | None = None
        self.live = False  # set once the start-up catch-up is done: later events are news
        self.service: Service | None = None
        self.ready_max_lag = ready_max_lag
        self.observer = Observer(self.name, metrics_port)
        self.observer.probe = self.health

    async def health(self) -> Health:
        """Ready once connected and the fold is within ``ready_max_lag`` of the stream."""
        connected = self.nc is not None and self.nc.is_connected
        seq = self.follower.seq if self.follower is not None else None
        return await ledger_health(connected, self.ledger, seq, self.ready_max_lag)

    def on_ledger_event(self, seq: int, event: Event, state: FleetState, index: int) -> None:
        """Called with each event once folded (``state`` includes it), at its address in the
        ledger (``seq``, ``index``: ``runtime.ledger_packing``); nothing by default."""

    def endpoints(self) -> Mapping[str, Handler]:
        """Endpoint name -> handler, served on ``<group>.<name>``."""
        raise NotImplementedError

    async def _on_start(self) -> None:
        await self.observer.start()  # first: /healthz answers while the ledger is folded
        self.nc = await connect(self.nats_url, self.service_name, on_closed=self.abort)
        ledger = self.ledger = LedgerStream(self.nc, keys=self.ledger_keys)
        await ledger.ensure()
        self.follower = LedgerFollower(ledger, on_event=self.on_ledger_event, metered=self.metered)
        await self.follower.catch_up()
        self.live = True
        self.spawn("ledger follower", self.follower.follow())
        self.service = await nats.micro.add_service(
            self.nc, name=self.service_name, version=self.version, description=self.description
        )
        group = self.service.add_group(name=self.group)
        for name, handler in self.endpoints().items():
            await group.add_endpoint(name=name, handler=handler)
        await self.nc.flush()  # the subscriptions reached the server: no "no responders" race

    async def _on_stop(self) -> None:
        if self.service is not None and self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(nats.errors.Error):  # closed meanwhile: nothing to stop
                await self.service.stop()
        await drain(self.nc)
        await self.observer.stop()
