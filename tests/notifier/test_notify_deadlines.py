"""Deadline notices as pure functions of the folded state, an instant and what was said before.

Each test moves "now" by hand (the ledger clock does the same in the service): no NATS, no
sleeping.  Covered: lease expiry at every lead time and never twice, funding expiry when a
window ends and when GPU-hours run out at the current burn (recomputed when the burn changes),
demotion and re-funding as they happen, budget renewal, and routing to channels by lead time.
"""

from __future__ import annotations

from _notify_world import T0, H, budget, channel, lease, world

from gpu_fleet.core.ledger import BudgetApplied, LeaseClosed, fold
from gpu_fleet.messages import notify
from gpu_fleet_notifier.channels import routes
from gpu_fleet_notifier.expiring import Memory, check, lead_times


def events(notes: list[notify.Notification]) -> list[tuple[str, str | None, int | None]]:
    return [
        (n.event, n.lease.split("@")[0] if n.lease else n.envelope, n.detail.get("lead"))
        for n in notes
    ]


class TestLeaseExpiry:
    def test_each_lead_once_then_nothing_after_the_end(self) -> None:
        st = world(budget(), leases=(lease("team/a", 0, end=T0 + 2 * H),))
        memory = Memory()
        leads = (H, 600)
        assert check(st, T0, 1, leads, memory) == []
        at_1h = check(st, T0 + H, 1, leads, memory)
        assert events(at_1h) == [("lease-expiring", "team/a", H)]
        assert at_1h[0].id == f"lease-expiring:team/a@{T0}#000:{T0 + 2 * H}:{H}"
        assert (at_1h[0].due, at_1h[0].severity, at_1h[0].envelope) == (
            T0 + 2 * H,
            "warning",
            "team/b/e",
        )
        assert check(st, T0 + H + 60, 1, leads, memory) == []  # said already
        at_10m = check(st, T0 + 2 * H - 600, 1, leads, memory)
        assert events(at_10m) == [("lease-expiring", "team/a", 600)]
        assert at_10m[0].detail["remainingSeconds"] == 600
        assert check(st, T0 + 2 * H, 1, leads, memory) == []  # the closure reports the end

    def test_a_late_check_gives_every_lead_due_longest_first(self) -> None:
        """The NATS subject hears both; routing then picks the most urgent per channel."""
        st = world(budget(), leases=(lease("team/a", 0, end=T0 + 2 * H),))
        notes = check(st, T0 + 2 * H - 300, 1, (H, 600), Memory())
        assert events(notes) == [
            ("lease-expiring", "team/a", H),
            ("lease-expiring", "team/a", 600),
        ]

    def test_lead_times_are_the_fleet_default_plus_every_channels(self) -> None:
        st = world(
            budget(),
            channels=(
                channel("a", spec="{target: {nats: true}, leadTimes: [1h, 10m]}"),
                channel("b", spec="{target: {nats: true}, leadTimes: [10m, 2h]}"),
            ),
        )
        assert lead_times(st, 900) == (2 * H, H, 900, 600)


class TestFundingExpiry:
    def test_a_window_end_is_announced_at_each_lead_with_the_demotion_instant(self) -> None:
        st = world(budget(end="2026-03-02T05:00:00Z"), leases=(lease("team/a", 0),))
        memory = Memory()
        assert [n for n in check(st, T0, 1, (H,), memory) if n.event == "funding-expiring"] == []
        notes = check(st, T0 + 4 * H, 1, (H,), memory)
        assert events(notes) == [("funding-expiring", "team/a", H)]
        note = notes[0]
        assert note.due == T0 + 5 * H
        assert note.reason == "window"
        assert note.envelope == "team/b/e"
        assert note.detail["windowEnd"] == T0 + 5 * H
        assert note.id == f"funding-expiring:team/a@{T0}#000:{T0 + 5 * H}:{H}"
        assert check(st, T0 + 4 * H + 30, 1, (H,), memory) == []

    def test_gpu_hours_running_out_are_announced_and_revised_when_the_burn_changes(self) -> None:
        """100 GPU-hours, a (2 GPUs) and b (2 GPUs): b demotes at 13h, a at 37h.  b finishing
        at 1h leaves a alone with 96 hours and a little (b started a second late) at 2/h: a's
        demotion moves to 49h and a second, a new warning."""
        a = lease("team/a", 0)
        b = lease("team/b", 2, start=T0 + 1)
        st = world(budget(hours=100), leases=(a, b))
        memory = Memory()
        leads = (14 * H,)  # long enough to reach b's and a's demotions from here
        first = [n for n in check(st, T0 + 1, 1, leads, memory) if n.event == "funding-expiring"]
        assert [(n.lease, n.due, n.reason) for n in first] == [(b.id, T0 + 13 * H + 1, "gpu-hours")]
        assert first[0].detail["burnGPUs"] == 4
        assert first[0].detail["exhaustedAt"] == T0 + 1 + 25 * H
        fold(st, LeaseClosed(at=T0 + H, lease=b.id, reason="Completed"))
        assert check(st, T0 + H, 2, leads, memory) == []  # a's demotion is 48h away now
        later = check(st, T0 + 36 * H, 3, leads, memory)
        assert [(n.event, n.lease, n.due) for n in later] == [
            ("funding-expiring", a.id, T0 + 49 * H + 1)
        ]

    def test_a_demotion_and_a_re_funding_are_reported_as_they_happen(self) -> None:
        """The window ends at 5h (demoted, at exactly 5h); a new window from 6h re-funds it."""
        st = world(budget(end="2026-03-02T05:00:00Z"), leases=(lease("team/a", 0),))
        memory = Memory()
        check(st, T0 + 4 * H, 1, (H,), memory)
        demoted = check(st, T0 + 5 * H + 17, 1, (H,), memory)
        assert [(n.event, n.at, n.detail.get("formerPayer")) for n in demoted] == [
            ("funding-demoted", T0 + 5 * H, "team/b/e")
        ]
        assert demoted[0].id == f"funding-demoted:team/a@{T0}#000:{T0 + 5 * H}"
        fold(
            st,
            BudgetApplied(
                at=T0 + 6 * H,
                budget=budget(start="2026-03-02T06:00:00Z", end="2026-03-03T00:00:00Z"),
            ),
        )
        restored = check(st, T0 + 6 * H, 2, (H,), memory)
        assert [(n.event, n.at, n.envelope) for n in restored] == [
            ("funding-restored", T0 + 6 * H, "team/b/e")
        ]


class TestRenewal:
    def test_an_auto_renewed_window_is_announced_once_within_notify_before(self) -> None:
        renew = ", autoRenew: {period: 720h, notifyBefore: 48h}"
        st = world(budget(end="2026-03-10T00:00:00Z", renew=renew))
        memory = Memory()
        end = T0 + 8 * 86400
        assert [n.event for n in check(st, end - 49 * H, 1, (H,), memory)] == []
        (note,) = check(st, end - 48 * H, 1, (H,), memory)
        assert (note.event, note.team, note.namespace, note.run) == (
            "budget-renewal-due",
            "org:team",
            "team",
            "",
        )
        assert (note.envelope, note.due, note.detail["period"]) == ("team/b/e", end, "720h")
        assert check(st, end - H, 1, (H,), memory) == []


class TestRoutingByLead:
    def test_each_channel_gets_its_most_urgent_due_lead_only(self) -> None:
        st = world(
            budget(),
            leases=(lease("team/a", 0, end=T0 + 2 * H),),
            channels=(
                channel("both", spec="{target: {nats: true}, leadTimes: [1h, 10m]}"),
                channel("hour", spec="{target: {nats: true}, leadTimes: [1h]}"),
                channel("default", spec="{target: {nats: true}}"),
            ),
        )
        late = check(st, T0 + 2 * H - 300, 1, lead_times(st, 900), Memory())
        got = {n.detail["lead"]: [c.metadata.name for c in routes(st, n, 900)] for n in late}
        assert got == {H: ["hour"], 900: ["default"], 600: ["both"]}


class TestWallClockChecks:
    def test_a_check_every_second_keeps_no_evaluation_per_second(self) -> None:
        """A quiet fleet on the wall clock is checked twice a second for hours: the funding
        picture at each instant must not pile up in the state's per-instant cache."""
        st = world(budget(hours=1000), leases=(lease("team/a", 0),))
        memory = Memory()
        for second in range(300):
            check(st, T0 + 60 + second, 1, (H,), memory)
        assert len(st._evaluations) <= 1
        assert memory.checked_at == T0 + 359
