"""The cyclic collector's pause around a pure computation (``core.gcpause``)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from gpu_fleet.core import gcpause
from gpu_fleet.core.gcpause import paused_gc


class Box:
    """A container the collector tracks."""

    inner: object = None


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_is_off_inside_and_on_again_after() -> None:
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_nested_pause_leaves_the_outer_one_alone() -> None:
    with paused_gc():
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_exception_in_the_block_resumes_it() -> None:
    with pytest.raises(ValueError, match="boom"), paused_gc():
        raise ValueError("boom")
    assert gc.isenabled()


def oldest() -> set[int]:
    return {id(x) for x in gc.get_objects(generation=2)}


def test_what_a_large_block_leaves_alive_goes_to_the_oldest_generation() -> None:
    """The young collections after the pause do not walk the block's result: it is in the
    oldest generation at once (it would be in the middle one after the first collection)."""
    gc.collect()
    with paused_gc():
        kept = [Box() for _ in range(gcpause.PROMOTE_FROM)]
    assert all(gc.is_tracked(x) for x in kept)
    gc.collect(0)
    assert all(id(x) in oldest() for x in kept[:: len(kept) // 10])


def test_what_a_small_block_leaves_alive_stays_young() -> None:
    """Below ``PROMOTE_FROM`` young objects the collector keeps its usual generations: the
    first young collection moves them to the middle one, not the oldest."""
    gc.collect()
    with paused_gc():
        kept = [Box() for _ in range(10)]
    gc.collect(0)
    assert not any(id(x) in oldest() for x in kept)
    assert {id(x) for x in gc.get_objects(generation=1)} >= {id(x) for x in kept}


def test_a_frozen_heap_stays_frozen() -> None:
    """A service freezes its settled heap (``runtime.heap``); a pause must not hand it back."""
    gc.collect()
    settled = Box()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with paused_gc():
            kept = [Box() for _ in range(gcpause.PROMOTE_FROM)]
        assert gc.get_freeze_count() >= frozen
        assert gc.is_tracked(kept[0])
        assert id(settled) not in oldest()
    finally:
        gc.unfreeze()


def test_a_cycle_the_block_drops_is_still_collected() -> None:
    with paused_gc():
        box = Box()
        box.inner = box
        gone = weakref.ref(box)
        del box
    gc.collect()
    assert gone() is None
