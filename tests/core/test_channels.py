"""NotificationChannel: validated like every manifest, recorded in the ledger, never its secret.

A channel is a third kind beside Budget and Run: parsed by ``parse_manifests`` (every error at
once, each with its path, nothing built when anything is wrong), applied by ``Fleet.apply`` as a
``ChannelApplied`` event (no reconcile: a channel changes no scheduling decision), deleted with
``ChannelDeleted``, folded into ``FleetState.channels`` and kept by snapshots.  Scenarios stay
about scheduling: ``validate_manifest`` refuses the kind.
"""

from __future__ import annotations

import msgspec
import pytest

from gpu_fleet.core.engine import CommandError, Fleet
from gpu_fleet.core.ledger import (
    EVENT_DECODER,
    EVENT_ENCODER,
    ChannelApplied,
    ChannelDeleted,
    snapshot,
)
from gpu_fleet.core.manifests import ManifestError, parse_manifests, validate_manifest
from gpu_fleet.core.model import NOTIFICATION_EVENTS, NotificationChannel
from gpu_fleet.views.log_context import event_context

T0 = 1_772_409_600

GOOD = """
apiVersion: rq.davidlangworthy.io/v1
kind: NotificationChannel
metadata: {name: slack, namespace: team}
spec:
  target: {webhook: "https://hooks.example.com/services/T0/B0/x"}
  format: slack
  filter: {events: [lease-expiring, funding-expiring], runs: [train, other/eval], severity: warning}
  leadTimes: [1h, 10m]
  secretRef: {name: team-hook}
"""


def channel(text: str = GOOD) -> NotificationChannel:
    (m,) = parse_manifests(text, source="test")
    assert isinstance(m, NotificationChannel)
    return m


def errors_of(spec: str, name: str = "c") -> list[str]:
    text = (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: NotificationChannel\n"
        f"metadata: {{name: {name}, namespace: team}}\nspec: {spec}\n"
    )
    with pytest.raises(ManifestError) as info:
        parse_manifests(text, source="t")
    return [str(e) for e in info.value.errors]


class TestValidation:
    def test_a_good_channel_parses_with_defaults(self) -> None:
        ch = channel()
        assert ch.key == "team/slack"
        assert ch.spec.target.webhook == "https://hooks.example.com/services/T0/B0/x"
        assert ch.spec.lead_times == ("1h", "10m")
        assert ch.spec.scope == "namespace"
        assert ch.spec.secret_ref is not None
        assert (ch.spec.secret_ref.name, ch.spec.secret_ref.key) == ("team-hook", "secret")

    def test_nats_only_needs_no_secret(self) -> None:
        ch = channel(GOOD.split("spec:", maxsplit=1)[0] + "spec: {target: {nats: true}}\n")
        assert (ch.spec.target.nats, ch.spec.secret_ref, ch.spec.format) == (True, None, "json")

    def test_every_error_at_once_with_its_path(self) -> None:
        got = errors_of(
            "{target: {webhook: 'ftp://u:p@x/y', nats: true}, format: teams,"
            " filter: {events: [lease-expring, lease-expring], runs: [Bad_Run], severity: loud},"
            " leadTimes: [1h, 60m, 0s, soon, 40d], secretRef: {env: X, file: /y}, extra: 1}",
            name="Bad.Name",
        )
        assert got == [
            "spec.extra: unknown field",
            "spec.format: must be one of 'json', 'slack', got 'teams'",
            "spec.filter.severity: must be one of 'critical', 'info', 'warning', got 'loud'",
            "metadata.name: must be a DNS-1123 label (lowercase letters, digits and '-', "
            "starting and ending with a letter or digit)",
            "spec.target: must set only one of webhook and nats",
            "spec.target.webhook: must be an http or https URL, got scheme 'ftp'",
            "spec.secretRef: must set exactly one of name (a Kubernetes Secret), file or env, "
            "got file and env",
            "spec.filter.events[0]: unknown event 'lease-expring': must be one of "
            + ", ".join(NOTIFICATION_EVENTS),
            "spec.filter.events[1]: duplicate event 'lease-expring' (also at "
            "spec.filter.events[0])",
            "spec.filter.runs[0]: must be a DNS-1123 label (lowercase letters, digits and '-', "
            "starting and ending with a letter or digit)",
            "spec.leadTimes[1]: duplicate lead time '60m' (same as spec.leadTimes[0])",
            "spec.leadTimes[2]: must be > 0",
            "spec.leadTimes[3]: 'soon' is not a duration such as 30s, 15m or 1h30m",
            "spec.leadTimes[4]: must be at most 30d",
        ]

    @pytest.mark.parametrize(
        ("spec", "expected"),
        [
            ("{}", "spec.target: required"),
            ("{target: {}}", "spec.target: must set webhook (an http or https URL) or nats: true"),
            (
                "{target: {webhook: 'https://x.example/h'}}",
                "spec.secretRef: required with target.webhook: every webhook is signed",
            ),
            (
                "{target: {webhook: 'https://me:pw@x.example/h'}, secretRef: {env: S}}",
                "spec.target.webhook: must not carry credentials (user:password@); "
                "sign with secretRef instead",
            ),
            (
                "{target: {webhook: 'https:///h'}, secretRef: {env: S}}",
                "spec.target.webhook: must be an http or https URL with a host",
            ),
            (
                "{target: {nats: true}, secretRef: {}}",
                "spec.secretRef: must set exactly one of name (a Kubernetes Secret), file or env",
            ),
            (
                "{target: {nats: true}, secretRef: {env: 'MY-VAR'}}",
                "spec.secretRef.env: must be an environment variable name (A-Z, 0-9, _)",
            ),
            (
                "{target: {nats: true}, scope: org}",
                "spec.scope: must be one of 'namespace', 'team', got 'org'",
            ),
        ],
        ids=[
            "no-target",
            "empty-target",
            "unsigned",
            "credentials",
            "no-host",
            "empty-ref",
            "bad-env",
            "bad-scope",
        ],
    )
    def test_one_rule_each(self, spec: str, expected: str) -> None:
        assert errors_of(spec) == [expected]

    def test_scenarios_refuse_channels(self) -> None:
        doc = {
            "apiVersion": "rq.davidlangworthy.io/v1",
            "kind": "NotificationChannel",
            "metadata": {"name": "c"},
            "spec": {"target": {"nats": True}},
        }
        with pytest.raises(ManifestError) as info:
            validate_manifest(doc, "objects[0]")
        assert [str(e) for e in info.value.errors] == [
            "objects[0].kind: unsupported kind 'NotificationChannel': must be Budget or Run"
        ]


class TestLedger:
    def test_apply_records_the_channel_and_reconciles_nothing(self) -> None:
        fleet = Fleet()
        events = fleet.apply(channel(), T0)
        assert [type(e).__name__ for e in events] == ["ChannelApplied"]
        assert fleet.state.channels["team/slack"] == channel()
        assert fleet.state.funding_epoch == 0  # funding-neutral

    def test_the_event_carries_the_reference_not_a_secret(self) -> None:
        event = ChannelApplied(at=T0, channel=channel())
        wire = EVENT_ENCODER.encode(event)
        assert b'"secretRef":{"name":"team-hook","key":"secret"' in wire
        assert EVENT_DECODER.decode(wire) == event

    def test_delete_removes_it_and_an_unknown_one_is_not_found(self) -> None:
        fleet = Fleet()
        fleet.apply(channel(), T0)
        events = fleet.delete("NotificationChannel", "team", "slack", T0 + 1)
        assert events == [ChannelDeleted(at=T0 + 1, namespace="team", name="slack")]
        assert fleet.state.channels == {}
        with pytest.raises(CommandError, match="notification channel team/slack not found"):
            fleet.delete("NotificationChannel", "team", "slack", T0 + 2)

    def test_a_snapshot_keeps_channels(self) -> None:
        fleet = Fleet()
        fleet.apply(channel(), T0)
        restored = snapshot.restore(snapshot.take(fleet.state, 1))
        assert restored is not None
        assert restored[0].channels == fleet.state.channels

    def test_an_older_snapshot_without_channels_still_loads(self) -> None:
        fleet = Fleet()
        raw = msgspec.msgpack.decode(snapshot.take(fleet.state, 1))
        del raw["channels"]
        restored = snapshot.restore(msgspec.msgpack.encode(raw))
        assert restored is not None
        assert restored[0].channels == {}


def test_the_managers_log_line_names_the_channel() -> None:
    applied = event_context(ChannelApplied(at=T0, channel=channel()))
    assert applied == {
        "type": "ChannelApplied",
        "at": T0,
        "channel": "team/slack",
        "format": "slack",
    }
    deleted = event_context(ChannelDeleted(at=T0, namespace="team", name="slack"))
    assert deleted == {"type": "ChannelDeleted", "at": T0, "channel": "team/slack"}
