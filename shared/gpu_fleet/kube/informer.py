"""An informer: a local cache of one resource kept current by list-then-watch.

The craft, as client-go's reflector does it:

* list, remember the list's resourceVersion, then watch *from that version* - no event between
  the list and the watch is lost, and none is replayed;
* every event (and every BOOKMARK, which carries only a resourceVersion) moves the remembered
  version forward, so a watch that ends (``timeoutSeconds``, a dropped connection) resumes from
  where it was, not from a fresh list;
* 410 Gone (the version was compacted away) means the cache may have missed deletions: re-list
  at once and replace the cache;
* any other failure backs off exponentially (with a cap) before trying again, and a successful
  list resets the backoff.

``on_change`` is called after every change to the cache; the bridge uses it to schedule one
level-triggered reconcile (the cache is the input, not the event).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from gpu_fleet.kube.client import GoneError, KubeClient
from gpu_fleet.kube.objects import Obj, Resource, key_of, rv_of

log = structlog.get_logger("gpu_fleet.kube.informer")


class Informer:
    def __init__(
        self,
        client: KubeClient,
        res: Resource,
        on_change: Callable[[], None] = lambda: None,
        *,
        watch_timeout: int = 300,
        backoff_initial: float = 0.2,
        backoff_max: float = 30.0,
    ) -> None:
        self.client = client
        self.res = res
        self.on_change = on_change
        self.watch_timeout = watch_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.cache: dict[tuple[str, str], Obj] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.lists = 0
        self.relists_on_gone = 0
        self.failures = 0

    def items(self) -> list[Obj]:
        """Cached objects in (namespace, name) order: deterministic walks."""
        return [self.cache[k] for k in sorted(self.cache)]

    def get(self, namespace: str, name: str) -> Obj | None:
        return self.cache.get((namespace, name))

    async def _list(self) -> None:
        items, rv = await self.client.list(self.res)
        self.cache = {key_of(o): o for o in items}
        self.resource_version = rv
        self.lists += 1
        self.synced.set()
        self.on_change()

    async def _watch(self) -> None:
        async for ev in self.client.watch(self.res, self.resource_version, self.watch_timeout):
            rv = rv_of(ev.object)
            if ev.type == "BOOKMARK":
                if rv:
                    self.resource_version = rv
                continue
            key = key_of(ev.object)
            if ev.type == "DELETED":
                self.cache.pop(key, None)
            else:
                self.cache[key] = ev.object
            if rv:
                self.resource_version = rv
            self.on_change()

    async def run(self) -> None:
        """List, then watch forever; re-list on 410, back off on other failures."""
        delay = self.backoff_initial
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                    delay = self.backoff_initial
                await self._watch()
            except GoneError as exc:
                self.relists_on_gone += 1
                log.info("informer.relist", resource=self.res.plural, reason=exc.message)
                need_list = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                log.warning(
                    "informer.retry",
                    resource=self.res.plural,
                    error=f"{type(exc).__name__}: {exc}",
                    backoff_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
