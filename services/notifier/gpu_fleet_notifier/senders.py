"""How one attempt reaches a receiver: a ``Sender`` per target kind, one registry.

* ``WebhookSender``: an HTTP POST (aiohttp) of the channel's format, signed (``signing``), with
  the idempotency and delivery headers, a per-attempt timeout and no redirects followed.
* ``NatsSender``: a JetStream publish to ``fleet.channel.<namespace>.<channel>.<event>`` (stream
  ``NOTIFY_CHANNELS``) with ``Nats-Msg-Id`` = the delivery id, signed the same way when the
  channel names a secret.

What an answer means:

* 2xx: delivered.
* 408, 425, 429, 5xx, a timeout or a connection error: retryable (``Retry-After`` is read, in
  seconds or as an HTTP date).
* any other status (3xx, 4xx): permanent - the request itself is refused, so it is
  dead-lettered at once instead of being retried N times.
* the secret cannot be read: retryable (the team can fix the Secret or the file).

URLs are shown with their path elided (``https://hooks.slack.com/…``): a Slack webhook's path is
itself a credential and must not reach logs or the history.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp
import nats.errors
from nats.js import JetStreamContext

from gpu_fleet.core.model import NotificationChannel
from gpu_fleet.messages import notify, subjects
from gpu_fleet_notifier import signing
from gpu_fleet_notifier.formats import FORMATS
from gpu_fleet_notifier.policy import DeliveryClock
from gpu_fleet_notifier.secrets import SecretResolver, SecretUnavailableError

BODY_LIMIT = 1024  # bytes of the receiver's answer kept for the history and `notify test`
RETRYABLE_STATUS = frozenset({408, 425, 429})


@dataclass(frozen=True)
class SendResult:
    ok: bool
    target: str
    status: int | None = None
    body: str = ""
    error: str = ""
    retry_after: float | None = None
    permanent: bool = False
    ms: float = 0.0
    signature: str = ""


class Sender(Protocol):
    async def send(
        self,
        channel: NotificationChannel,
        note: notify.Notification,
        *,
        attempt: int,
        delivery: str,
    ) -> SendResult: ...


def redact(url: str) -> str:
    """``scheme://host[:port]/…``: enough to know where, nothing that grants access."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


def endpoint_of(channel: NotificationChannel) -> str:
    """What a breaker and a concurrency limit are per: the receiver's origin, or NATS."""
    url = channel.spec.target.webhook
    if url is None:
        return "nats"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"


def target_of(channel: NotificationChannel) -> str:
    url = channel.spec.target.webhook
    if url is not None:
        return f"webhook {redact(url)}"
    ns, name = channel.metadata.namespace, channel.metadata.name
    return f"nats {subjects.channel(ns, name, '<event>')}"


def headers_for(
    note: notify.Notification,
    body: bytes,
    secret: bytes | None,
    *,
    attempt: int,
    delivery: str,
    now: float,
) -> dict[str, str]:
    headers = {
        signing.ID_HEADER: note.id,
        signing.EVENT_HEADER: note.event,
        signing.DELIVERY_HEADER: delivery,
        signing.ATTEMPT_HEADER: str(attempt),
    }
    if secret is not None:
        headers[signing.SIGNATURE_HEADER] = signing.sign(secret, int(now), body)
    return headers


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class WebhookSender:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        clock: DeliveryClock,
        secrets: SecretResolver,
        timeout: float,
        user_agent: str,
    ) -> None:
        self.session = session
        self.clock = clock
        self.secrets = secrets
        self.timeout = timeout
        self.user_agent = user_agent

    async def send(
        self,
        channel: NotificationChannel,
        note: notify.Notification,
        *,
        attempt: int,
        delivery: str,
    ) -> SendResult:
        url = channel.spec.target.webhook
        assert url is not None
        target = f"webhook {redact(url)}"
        try:
            secret = self.secrets.resolve(channel)
        except SecretUnavailableError as exc:
            return SendResult(ok=False, target=target, error=f"secret unavailable: {exc}")
        fmt = FORMATS[channel.spec.format]
        body = fmt.render(note)
        headers = headers_for(
            note, body, secret, attempt=attempt, delivery=delivery, now=self.clock.now()
        )
        headers["Content-Type"] = fmt.content_type
        headers["User-Agent"] = self.user_agent
        signature = headers.get(signing.SIGNATURE_HEADER, "")
        started = time.perf_counter()
        try:
            async with self.session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                answer = (await resp.content.read(BODY_LIMIT)).decode("utf-8", "replace")
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            return SendResult(
                ok=False,
                target=target,
                error=f"timed out after {self.timeout:g}s",
                ms=_ms(started),
                signature=signature,
            )
        except aiohttp.ClientError as exc:
            return SendResult(
                ok=False,
                target=target,
                error=f"{type(exc).__name__}: {exc}"[:300],
                ms=_ms(started),
                signature=signature,
            )
        ok = 200 <= status < 300
        retryable = status in RETRYABLE_STATUS or status >= 500
        return SendResult(
            ok=ok,
            target=target,
            status=status,
            body=answer,
            error="" if ok else f"HTTP {status}",
            retry_after=retry_after if not ok else None,
            permanent=not ok and not retryable,
            ms=_ms(started),
            signature=signature,
        )


class NatsSender:
    def __init__(self, js: JetStreamContext, clock: DeliveryClock, secrets: SecretResolver) -> None:
        self.js = js
        self.clock = clock
        self.secrets = secrets

    async def send(
        self,
        channel: NotificationChannel,
        note: notify.Notification,
        *,
        attempt: int,
        delivery: str,
    ) -> SendResult:
        ns, name = channel.metadata.namespace, channel.metadata.name
        subject = subjects.channel(ns, name, note.event)
        target = f"nats {subject}"
        try:
            secret = self.secrets.resolve(channel)
        except SecretUnavailableError as exc:
            return SendResult(ok=False, target=target, error=f"secret unavailable: {exc}")
        body = FORMATS[channel.spec.format].render(note)
        headers = headers_for(
            note, body, secret, attempt=attempt, delivery=delivery, now=self.clock.now()
        )
        headers["Nats-Msg-Id"] = delivery
        started = time.perf_counter()
        try:
            await self.js.publish(subject, body, headers=headers)
        except (TimeoutError, nats.errors.Error) as exc:
            return SendResult(
                ok=False, target=target, error=f"{type(exc).__name__}: {exc}"[:300], ms=_ms(started)
            )
        return SendResult(
            ok=True,
            target=target,
            ms=_ms(started),
            signature=headers.get(signing.SIGNATURE_HEADER, ""),
        )


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
