"""Forecast accuracy from ledger events: the forecast when a wait begins, judged at the start."""

from __future__ import annotations

from test_fleet_map import example_fleet

from gpu_fleet.core.forecast import forecast
from gpu_fleet.core.ledger import ReservationCreated, RunDeleted, RunStatusChanged
from gpu_fleet.views.forecast_accuracy import ForecastAccuracy
from gpu_fleet.views.metrics import SPECS, Increment

RUN = "rai/sweep-6"  # waits on a capacity reservation in the example fleet


def bound(run: str, at: int) -> RunStatusChanged:
    return RunStatusChanged(at=at, run=run, phase="Running", reason="GangBound")


def test_the_forecast_at_the_start_of_the_wait_is_kept_and_judged_at_the_start() -> None:
    fleet, at = example_fleet()
    state = fleet.state
    res = state.pending_reservation(RUN)
    assert res is not None
    expected = forecast(state, RUN, res.created_at, remedies=False)
    assert expected.p90 is not None

    accuracy = ForecastAccuracy(live=True)
    assert accuracy.on_event(ReservationCreated(at=res.created_at, reservation=res), state) == []
    assert accuracy.pending == {RUN: (expected.p50, expected.p90)}
    # A later reservation of the same run does not replace the first forecast.
    accuracy.on_event(ReservationCreated(at=at, reservation=res), state)
    assert accuracy.pending == {RUN: (expected.p50, expected.p90)}

    out = accuracy.on_event(bound(RUN, expected.p90 + 60), state)  # a minute past the P90
    assert Increment("gpu_fleet_forecast_starts_total", ("p90", "false")) in out
    assert Increment("gpu_fleet_forecast_error_seconds", ("p90",), 60.0) in out
    assert accuracy.pending == {}
    for item in out:
        assert len(item.labels) == len(SPECS[item.name].labels)
        assert "forecaster" in SPECS[item.name].exported_by


def test_hits_misses_and_an_unknown_p50() -> None:
    fleet, _ = example_fleet()
    accuracy = ForecastAccuracy(live=True)
    accuracy.pending = {"a/early": (1000, 2000), "a/between": (1000, 2000), "a/p90": (None, 2000)}
    assert accuracy.on_event(bound("a/early", 900), fleet.state) == [
        Increment("gpu_fleet_forecast_starts_total", ("p50", "true")),
        Increment("gpu_fleet_forecast_error_seconds", ("p50",), 100.0),
        Increment("gpu_fleet_forecast_starts_total", ("p90", "true")),
        Increment("gpu_fleet_forecast_error_seconds", ("p90",), 1100.0),
    ]
    assert accuracy.on_event(bound("a/between", 1500), fleet.state) == [
        Increment("gpu_fleet_forecast_starts_total", ("p50", "false")),
        Increment("gpu_fleet_forecast_error_seconds", ("p50",), 500.0),
        Increment("gpu_fleet_forecast_starts_total", ("p90", "true")),
        Increment("gpu_fleet_forecast_error_seconds", ("p90",), 500.0),
    ]
    assert accuracy.on_event(bound("a/p90", 2000), fleet.state) == [  # no P50: not counted
        Increment("gpu_fleet_forecast_starts_total", ("p90", "true")),
        Increment("gpu_fleet_forecast_error_seconds", ("p90",), 0.0),
    ]
    assert accuracy.on_event(bound("a/unknown", 5), fleet.state) == []  # never seen waiting


def test_history_replayed_at_start_up_and_runs_that_never_start_are_not_counted() -> None:
    fleet, at = example_fleet()
    state = fleet.state
    res = state.pending_reservation(RUN)
    assert res is not None
    replaying = ForecastAccuracy(live=False)
    replaying.on_event(ReservationCreated(at=res.created_at, reservation=res), state)
    assert replaying.pending == {}
    assert replaying.on_event(bound(RUN, at), state) == []

    accuracy = ForecastAccuracy(live=True, pending={"a/x": (1, 2), "a/y": (1, 2)})
    accuracy.on_event(RunDeleted(at=at, run="a/x"), state)
    accuracy.on_event(RunStatusChanged(at=at, run="a/y", phase="Failed", reason="x"), state)
    assert accuracy.pending == {}
