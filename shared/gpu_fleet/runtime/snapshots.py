"""Where snapshots live: the JetStream object store ``FLEET_SNAPSHOTS`` (file storage).

An object store, not a KV bucket, because a snapshot carries the event history and can exceed
a single message's size; the store chunks it.  Losing or corrupting a snapshot costs only time:
the caller then folds the ledger from the start.
"""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from gpu_fleet.runtime.natsd_cluster import stream_replicas

BUCKET = "FLEET_SNAPSHOTS"


class SnapshotStore:
    def __init__(self, nc: Client) -> None:
        self.js = nc.jetstream()
        self._store: ObjectStore | None = None

    async def _bucket(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self.js.object_store(BUCKET)
            except nats.js.errors.BucketNotFoundError:
                self._store = await self.js.create_object_store(
                    BUCKET,
                    ObjectStoreConfig(
                        description="gpu-fleet state snapshots (an optimisation, never the truth)",
                        storage=StorageType.FILE,
                        replicas=stream_replicas(),
                    ),
                )
        return self._store

    async def save(self, name: str, data: bytes) -> None:
        await (await self._bucket()).put(name, data)

    async def load(self, name: str) -> bytes | None:
        try:
            result = await (await self._bucket()).get(name)
        except nats.js.errors.ObjectNotFoundError:
            return None
        data = result.data
        return bytes(data) if data is not None else None
