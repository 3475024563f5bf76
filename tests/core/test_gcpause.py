"""The cyclic collector's pause around a pure computation (``core.gcpause``).  What a service's
heap policy does with a large result (``on_large_result``) is tested with that policy, in a
process of its own (tests/runtime/test_heap.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gpu_fleet.core import gcpause
from gpu_fleet.core.gcpause import paused_gc


class Box:
    """A container the collector tracks."""


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each call of the hook, with the young objects the block left."""
    out: list[int] = []
    monkeypatch.setattr(gcpause, "on_large_result", lambda: out.append(gc.get_count()[0]))
    return out


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


def test_without_a_policy_a_large_result_ages_as_python_ages_it() -> None:
    """A library process keeps Python's collector: the result is young, and the first young
    collection moves it to the middle generation, with nothing frozen."""
    assert gcpause.on_large_result is None
    gc.collect()
    with paused_gc():
        kept = [Box() for _ in range(2 * gcpause.LARGE_RESULT_FROM)]
    assert gc.get_freeze_count() == 0
    gc.collect(0)
    middle = {id(x) for x in gc.get_objects(generation=1)}
    assert all(id(x) in middle for x in kept[:: len(kept) // 10])


def test_the_hook_is_called_once_a_large_block_ends(calls: list[int]) -> None:
    gc.collect()
    with paused_gc():
        kept = [Box() for _ in range(2 * gcpause.LARGE_RESULT_FROM)]
        assert gc.get_count()[0] >= gcpause.LARGE_RESULT_FROM  # the block is large
    assert len(calls) == 1
    assert calls[0] >= len(kept) // 2


def test_the_hook_is_not_called_after_a_small_block(calls: list[int]) -> None:
    gc.collect()
    with paused_gc():
        _kept = [Box() for _ in range(10)]
    assert calls == []


def test_the_hook_is_not_called_after_an_exception(calls: list[int]) -> None:
    """The traceback holds the block's partial state: not the state's to keep."""

    def large_then_fails() -> None:
        with paused_gc():
            kept = [Box() for _ in range(2 * gcpause.LARGE_RESULT_FROM)]
            raise ValueError(f"late, after {len(kept)}")

    gc.collect()
    with pytest.raises(ValueError, match="late"):
        large_then_fails()
    assert calls == []
