"""The duration history (``gpu_fleet.core.history``): a censored survival curve, not a median."""

from __future__ import annotations

import pytest

from gpu_fleet.core.forecast import Curve


class TestCurve:
    def test_without_censoring_it_is_the_empirical_survival(self) -> None:
        curve = Curve.fit([(10, True), (20, True), (30, True), (40, True)])
        assert curve.times == (10, 20, 30, 40)
        assert curve.survival == pytest.approx((0.75, 0.5, 0.25, 0.0))
        assert curve.median_after(0) == 20

    def test_runs_still_running_keep_the_median_from_being_early(self) -> None:
        """Two short runs completed while eight are still running past 100 s: the completed
        ones alone would say "half end by 10 s"; the censored curve says it cannot know."""
        done = [(5, True), (10, True)]
        running = [(100, False)] * 8
        assert Curve.fit(list(done)).median_after(0) == 5
        curve = Curve.fit(done + running)
        assert curve.survival_at(10) == pytest.approx(0.8)
        assert curve.median_after(0) is None

    def test_remaining_life_is_conditioned_on_age(self) -> None:
        curve = Curve.fit([(60, True), (120, True), (3600, True), (7200, True)])
        assert curve.median_after(0) == 120
        assert curve.median_after(300) == 3600  # of the runs that lived 5 min, half end by 1 h
        assert curve.median_after(7200) is None  # older than anything seen: unknown

    def test_ties_between_ends_and_censoring(self) -> None:
        """A run still running at exactly an end time was at risk at that time (KM convention)."""
        curve = Curve.fit([(10, True), (10, False), (20, True)])
        assert curve.survival == pytest.approx((2 / 3, 0.0))
        assert curve.events == 2
