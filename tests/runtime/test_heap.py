"""The services' garbage-collector policy (runtime.heap), in a process of its own: freezing
the test runner's heap would change how every later test collects its garbage."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import gc, weakref
    from gpu_fleet.runtime import heap

    class Node:
        pass

    heap.settle()  # not enabled: Python's default collector, nothing frozen
    assert gc.get_freeze_count() == 0, "froze without enable()"

    heap.enable(sweep_every=3)
    cycle = Node()
    cycle.me = cycle
    alive = Node()
    ref, kept = weakref.ref(cycle), weakref.ref(alive)
    heap.settle()
    assert gc.get_freeze_count() > 0, "settle did not freeze"
    del cycle, alive
    gc.collect()
    assert ref() is not None, "a frozen object was walked by an ordinary collection"
    assert kept() is None, "reference counting must still free a frozen object"
    heap.settle()
    assert ref() is not None
    heap.settle()  # the third settle sweeps
    assert ref() is None, "the sweep did not reclaim the frozen cycle"
    assert gc.get_freeze_count() > 0, "the sweep did not freeze again"

    heap.enable(sweep_every=1000)  # now by time: a minute since the last sweep
    cycle = Node()
    cycle.me = cycle
    ref = weakref.ref(cycle)
    heap.settle()
    del cycle
    heap.settle()
    assert ref() is not None, "swept before its time"
    heap._policy.swept_at -= heap.SWEEP_SECONDS  # as if a minute had passed
    heap.settle()
    assert ref() is None, "no sweep a minute after the last one"
    print("ok")
    """
)


def test_settle_freezes_and_a_sweep_every_nth_settle_or_minute_reclaims_frozen_cycles() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "ok"
    assert "heap.swept" in done.stdout  # the reclaimed cycle is reported


RESULT_SCRIPT = textwrap.dedent(
    """
    import gc, weakref
    from gpu_fleet.core import gcpause
    from gpu_fleet.core.gcpause import paused_gc
    from gpu_fleet.runtime import heap

    class Node:
        pass

    def walked():
        return {id(x) for g in range(3) for x in gc.get_objects(generation=g)}

    gc.collect()
    with paused_gc():
        young = [Node() for _ in range(2 * gcpause.LARGE_RESULT_FROM)]
    assert gc.get_freeze_count() == 0, "froze without the policy"
    assert id(young[0]) in walked()

    heap.enable()
    gc.collect()
    before = gc.get_freeze_count()
    with paused_gc():
        result = [Node() for _ in range(2 * gcpause.LARGE_RESULT_FROM)]
    assert gc.get_freeze_count() >= before + len(result), "a large result was not frozen"
    assert id(result[-1]) not in walked(), "the collector still walks the result"

    frozen = gc.get_freeze_count()
    with paused_gc():
        small = [Node() for _ in range(10)]
    assert gc.get_freeze_count() == frozen, "a small result was frozen"
    assert id(small[0]) in walked()

    # Only reads, no decision group: the large results' settles still sweep when one is due.
    with paused_gc():
        cycle = Node()
        cycle.me = cycle
        ref = weakref.ref(cycle)
        del cycle
        read = [Node() for _ in range(2 * gcpause.LARGE_RESULT_FROM)]  # none freed: new names
    gc.collect()
    assert ref() is not None, "the cycle should be frozen with the result"
    heap._policy.swept_at -= heap.SWEEP_SECONDS  # as if a minute had passed
    with paused_gc():
        scrape = [Node() for _ in range(2 * gcpause.LARGE_RESULT_FROM)]
    assert ref() is None, "a cycle frozen with a result was never swept"
    print("ok")
    """
)


def test_a_service_freezes_what_a_large_pure_computation_leaves_alive() -> None:
    """With the policy, an evaluation's result (``core.gcpause.on_large_result``) is frozen as
    the pause ends, not walked by the next collections, and a cycle frozen with it is swept when
    a sweep is due even if no decision group settles; without the policy, nothing is frozen."""
    done = subprocess.run(
        [sys.executable, "-c", RESULT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "ok"
