"""What a receiver gets, and how it checks it: payload formats, the signature, routing rules,
backoff and the breaker - all pure, no NATS and no HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random

import msgspec
import pytest
from _notify_world import T0, H, budget, channel, world

from gpu_fleet.messages import notify
from gpu_fleet_notifier import signing
from gpu_fleet_notifier.channels import routes, wants
from gpu_fleet_notifier.formats import FORMATS, sentence
from gpu_fleet_notifier.policy import Backoff, Breaker, ScaledClock
from gpu_fleet_notifier.secrets import SecretResolver, SecretUnavailableError
from gpu_fleet_notifier.senders import parse_retry_after, redact

FUNDING = notify.Notification(
    id=f"funding-expiring:team/a@{T0}#000:{T0 + 5 * H}:600",
    team="org:team",
    event="funding-expiring",
    run="team/a",
    lease=f"team/a@{T0}#000",
    at=T0 + 5 * H - 600,
    detail={
        "remainingSeconds": 600,
        "causeText": "its envelope's GPU-hours run out at the current burn",
        "remainingGPUHours": 0.75,
        "burnGPUs": 4,
        "exhaustedAt": T0 + 5 * H + 2100,
        "lead": 600,
    },
    envelope="team/b/e",
    reason="gpu-hours",
    severity="warning",
    due=T0 + 5 * H,
    namespace="team",
)


class TestFormats:
    def test_json_is_the_notification_itself(self) -> None:
        body = FORMATS["json"].render(FUNDING)
        assert notify.DECODER.decode(body) == FUNDING

    def test_slack_says_what_when_and_why_in_one_sentence(self) -> None:
        body = json.loads(FORMATS["slack"].render(FUNDING))
        assert body["text"] == (
            f":money_with_wings: *Funding expiring in 10m*: lease `team/a@{T0}#000` of run "
            "`team/a` will run unfunded from 2026-03-02T05:00:00Z because its envelope's "
            "GPU-hours run out at the current burn (envelope `team/b/e`, 0.75 GPU-hours left at a"
            " burn of 4 GPUs, empty at 2026-03-02T05:35:00Z). It keeps running, but the resolver"
            " may reclaim unfunded work."
        )
        assert body["blocks"][0] == {
            "type": "section",
            "text": {"type": "mrkdwn", "text": body["text"]},
        }
        assert FUNDING.id in body["blocks"][1]["elements"][0]["text"]

    def test_every_event_has_a_readable_sentence(self) -> None:
        for event in notify.EVENTS:
            note = msgspec.structs.replace(FUNDING, event=event, detail={})
            text = sentence(note)
            assert text.startswith(":") or text.startswith("*"), event
            assert "None" not in text, event


class TestSignature:
    SECRET = b"s3cr3t"

    def test_a_receiver_verifies_with_the_standard_library_alone(self) -> None:
        """What docs/notifications.md tells receivers to do, written without gpu-fleet."""
        body = FORMATS["slack"].render(FUNDING)
        header = signing.sign(self.SECRET, T0, body)
        fields = dict(part.split("=", 1) for part in header.split(","))
        expected = hmac.new(
            self.SECRET, fields["t"].encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        assert hmac.compare_digest(expected, fields["v1"])
        assert signing.verify(self.SECRET, header, body, now=T0 + 10) == T0

    @pytest.mark.parametrize(
        ("mutate", "message"),
        [
            (lambda h, b: (h, b + b" "), "signature does not match the body"),
            (lambda h, b: (h.replace("t=", "t=1"), b), "outside the 300s tolerance"),
            (lambda h, b: ("v1=abc", b), "malformed signature header"),
        ],
        ids=["tampered-body", "tampered-timestamp", "no-timestamp"],
    )
    def test_tampering_fails(self, mutate: object, message: str) -> None:
        body = FORMATS["json"].render(FUNDING)
        header, changed = mutate(signing.sign(self.SECRET, T0, body), body)  # type: ignore[operator]
        with pytest.raises(signing.SignatureError, match=message):
            signing.verify(self.SECRET, header, changed, now=T0)

    def test_a_replay_after_the_tolerance_is_refused(self) -> None:
        body = FORMATS["json"].render(FUNDING)
        header = signing.sign(self.SECRET, T0, body)
        signing.verify(self.SECRET, header, body, now=T0 + 300)
        with pytest.raises(signing.SignatureError, match="tolerance"):
            signing.verify(self.SECRET, header, body, now=T0 + 301)

    def test_during_a_rotation_either_secret_verifies(self) -> None:
        body = b"{}"
        old = signing.sign(b"old", T0, body)
        new = signing.sign(b"new", T0, body)
        both = f"{new},{old.split(',')[1]}"
        assert signing.verify(b"old", both, body, now=T0) == T0
        assert signing.verify(b"new", both, body, now=T0) == T0


class TestSecrets:
    def test_env_file_and_mounted_secret(self, tmp_path: object) -> None:
        from pathlib import Path  # noqa: PLC0415 - tmp_path is typed loosely above

        base = Path(str(tmp_path))
        (base / "team" / "hook").mkdir(parents=True)
        (base / "team" / "hook" / "secret").write_text("from-secret\n")
        (base / "f").write_text("  from-file \n")
        resolver = SecretResolver(str(base), environ={"HOOK": "from-env"})
        hook = "{target: {webhook: 'https://x.example/h'}, secretRef: %s}"
        assert resolver.resolve(channel(spec=hook % "{env: HOOK}")) == b"from-env"
        assert resolver.resolve(channel(spec=hook % f"{{file: '{base / 'f'}'}}")) == b"from-file"
        assert resolver.resolve(channel(spec=hook % "{name: hook}")) == b"from-secret"
        assert resolver.resolve(channel()) is None  # NATS only, no secret
        with pytest.raises(SecretUnavailableError, match="MISSING is not set"):
            resolver.resolve(channel(spec=hook % "{env: MISSING}"))
        with pytest.raises(SecretUnavailableError, match="no --secrets-dir"):
            SecretResolver(None, {}).resolve(channel(spec=hook % "{name: hook}"))


class TestRouting:
    def test_scope_filter_and_severity(self) -> None:
        st = world(
            budget("team", "org:team"),
            budget("lab", "org:team:lab", parents="org:team"),
            budget("other", "org:other"),
            channels=(
                channel("ns", spec="{target: {nats: true}}"),
                channel("all", spec="{target: {nats: true}, scope: team}"),
                channel(
                    "loud",
                    spec="{target: {nats: true}, scope: team,"
                    " filter: {severity: critical, runs: [a, lab/x]}}",
                ),
                channel("elsewhere", namespace="other", spec="{target: {nats: true}}"),
            ),
        )

        def to(run: str, event: str, severity: str = "info", team: str = "org:team") -> list[str]:
            note = msgspec.structs.replace(
                FUNDING,
                event=event,
                run=run,
                severity=severity,  # type: ignore[arg-type]
                team=team,
                namespace=run.split("/", maxsplit=1)[0],
            )
            return [c.metadata.name for c in routes(st, note, 900)]

        assert to("team/a", "run-completed") == ["all", "ns"]
        assert to("team/a", "run-failed", "critical") == ["all", "loud", "ns"]
        assert to("lab/x", "run-failed", "critical", team="org:team:lab") == ["all", "loud"]
        assert to("lab/y", "run-failed", "critical", team="org:team:lab") == ["all"]
        assert to("other/z", "run-failed", "critical", team="org:other") == ["elsewhere"]

    def test_dead_letters_and_tests_never_go_to_webhooks(self) -> None:
        hook = channel(spec="{target: {webhook: 'https://x.example/h'}, secretRef: {env: S}}")
        nats = channel(spec="{target: {nats: true}}")
        dead = msgspec.structs.replace(FUNDING, event="delivery-dead-lettered")
        assert not wants(hook, dead, frozenset({"org:team"}), 900)
        assert wants(nats, dead, frozenset({"org:team"}), 900)


class TestPolicy:
    def test_backoff_grows_is_capped_jittered_and_honours_retry_after(self) -> None:
        rng = random.Random(7)
        b = Backoff(base=2, factor=2, cap=60, jitter=0.5)
        delays = [b.delay(n, None, rng) for n in range(1, 8)]
        for n, d in enumerate(delays, start=1):
            raw = min(60, 2 * 2 ** (n - 1))
            assert raw / 2 <= d <= raw
        assert b.delay(1, 120.0, rng) == 120.0
        assert Backoff(retry_after_cap=30).delay(1, 120.0, rng) == 30.0

    def test_breaker_opens_after_the_threshold_and_lets_one_trial_through(self) -> None:
        br = Breaker(threshold=3, cooldown=30)
        for t in range(3):
            assert br.wait(t) == 0.0
            br.record(False, t)
        assert br.state(2) == "open"
        assert br.wait(12) == pytest.approx(20)
        assert br.wait(32) == 0.0  # the trial
        assert br.wait(32) > 0  # one at a time
        br.record(False, 33)  # the trial failed: open again for a full cooldown
        assert br.state(40) == "open"
        assert br.wait(63) == 0.0
        br.record(True, 63)
        assert br.state(63) == "closed"

    def test_a_scaled_clock_honours_seconds_in_milliseconds(self) -> None:
        clock = ScaledClock(0.001, start=T0)
        assert clock.real(120.0) == pytest.approx(0.12)
        assert clock.now() >= T0

    def test_retry_after_reads_seconds_and_http_dates(self) -> None:
        assert parse_retry_after("120") == 120.0
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
        assert parse_retry_after("soon") is None
        assert parse_retry_after(None) is None

    def test_urls_lose_their_path_before_they_are_shown(self) -> None:
        assert (
            redact("https://hooks.slack.com/services/T0/B0/secret") == "https://hooks.slack.com/…"
        )
        assert redact("http://127.0.0.1:8080/x?y=1") == "http://127.0.0.1:8080/…"
