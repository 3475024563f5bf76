"""Verifying a signed ledger one atomic batch at a time.

The manager appends each decision group as one atomic batch (``LedgerStream.append``) and signs
the *batch*, not every event: every message of the batch names its span in the
``Fleet-Ledger-Batch`` header (``"<first> <last>"``, stream sequences), and the last one carries
the Ed25519 signature over the span and a SHA-256 digest of every message in it
(``LedgerKeys.sign_batch``).  Why: verifying cost 0.1 ms per event on a 2-core machine, half of
a follower's CPU during a burst of admissions and most of a rebuild's; one verification per
batch of tens of events makes it a rounding error (issue 11, docs/security.md).

What a reader may conclude, and why it is as strict as one signature per event:

* A message is accepted only when every message of the span it claims is present, each claims
  that same span, and the signature on the span's last message verifies over all of them.
  The digest covers each message's sequence, subject and payload, so a batch copied to the end
  of the stream (a replay) or any altered, added or missing message fails as a whole.
* An atomic batch is stored contiguously, so a legitimate span never has a stranger inside.
  A message that claims no span is judged alone (a ledger written before batch signatures:
  each event then carries its own signature, ``LedgerKeys.verify``).
* A span whose last sequence the reader has passed without completing it is refused; so is a
  span longer than ``MAX_SPAN`` (a forger cannot make a reader hold messages for ever).

``BatchVerifier`` is pure (no I/O): readers feed it what they read, ask what is missing when
they started inside a batch, and take the verdicts.  ``InOrder`` releases verdicts in stream
order for the sequential readers (rebuilds and followers).
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gpu_fleet.runtime.ledger_keys import BATCH_HEADER, HEADER, LedgerKeys

MAX_SPAN = 10_000
"""The longest batch a reader waits to complete (the manager's batches stay far below it:
``FLUSH_AT`` events plus one decision; JetStream caps atomic batches too)."""

Span = tuple[int, int]


class Stored(Protocol):
    """A ledger message as a reader gets it (a delivered ``Msg``, a fetched ``RawStreamMsg``)."""

    @property
    def subject(self) -> str | None: ...

    @property
    def data(self) -> bytes | None: ...

    @property
    def headers(self) -> Mapping[str, str] | None: ...


Fetch = Callable[[int], Awaitable[Stored | None]]
"""The stored message at a sequence, ``None`` when the stream has none there."""


def claimed_span(headers: Mapping[str, str] | None) -> Span | None:
    """The ``(first, last)`` a message claims, ``None`` without a well-formed claim."""
    raw = (headers or {}).get(BATCH_HEADER)
    if raw is None:
        return None
    first, _, last = raw.partition(" ")
    if not (first.isdecimal() and last.isdecimal()):
        return (0, -1)  # malformed: a span nothing can complete
    return int(first), int(last)


@dataclass(frozen=True)
class _Held:
    subject: str
    data: bytes
    span: Span
    sig: str | None


class BatchVerifier:
    """Verdicts for ledger messages, fed in any order (each sequence once)."""

    def __init__(self, keys: LedgerKeys) -> None:
        self.keys = keys
        self._held: dict[int, _Held] = {}
        self._verdicts: dict[int, bool] = {}
        self._members: dict[Span, int] = {}  # span -> its members held

    def offer(self, seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        if seq in self._verdicts or seq in self._held:
            return
        span = claimed_span(headers)
        sig = (headers or {}).get(HEADER)
        # A batch is stored contiguously: a held span with another message inside it is not
        # a batch the manager appended, whatever comes later (a forger's far claim must not
        # hold the messages behind it until its end arrives).
        for other in [x for x in self._members if x[0] <= seq <= x[1] and x != span]:
            self.refuse(other)
        if span is None:  # no batch: its own signature or nothing
            self._verdicts[seq] = self.keys.verify(seq, subject, data, headers)
            return
        first, last = span
        if (
            not first <= seq <= last
            or last - first >= MAX_SPAN
            or (sig is not None) != (seq == last)
        ):
            self._verdicts[seq] = False
            return
        self._held[seq] = _Held(subject, data, span, sig)
        self._members[span] = self._members.get(span, 0) + 1
        if self._members[span] == last - first + 1:
            self._judge(span)

    def pop(self, seq: int) -> bool | None:
        """True (verified), False (refused) or None (its batch is not complete yet); a decided
        verdict is forgotten once taken (a long-lived reader keeps nothing)."""
        return self._verdicts.pop(seq, None)

    def forget_below(self, seq: int) -> None:
        """Drop the verdicts of sequences before ``seq`` (a reader that has passed them)."""
        for s in [s for s in self._verdicts if s < seq]:
            del self._verdicts[s]

    def span_of(self, seq: int) -> Span | None:
        """The batch ``seq`` waits for (``None``: not waiting)."""
        held = self._held.get(seq)
        return held.span if held is not None else None

    def span_end(self, seq: int) -> int | None:
        """The last sequence of the batch ``seq`` waits for (``None``: not waiting)."""
        span = self.span_of(seq)
        return span[1] if span is not None else None

    def missing(self, seq: int) -> list[int]:
        """Sequences of the span ``seq`` claims that were never offered (a reader that started
        inside the batch fetches them, then offers them)."""
        span = self.span_of(seq)
        if span is None:
            return []
        first, last = span
        return [
            s for s in range(first, last + 1) if s not in self._held and s not in self._verdicts
        ]

    def settle(self, through: int) -> None:
        """Refuse every message whose claimed span ends at or before ``through`` and is still
        not complete: a reader that has passed a span's end will never complete it."""
        for span in sorted(x for x in self._members if x[1] <= through):
            self.refuse(span)

    def impossible(self, stored_last: int) -> None:
        """Refuse every span that ends past the stream's last sequence: an atomic batch is
        stored whole, so a reader holding one of its messages could fetch all of them."""
        for span in sorted(x for x in self._members if x[1] > stored_last):
            self.refuse(span)

    def refuse(self, span: Span) -> None:
        """Judge ``span`` now: whoever of it is held is refused (it cannot be complete)."""
        if span in self._members:
            self._judge(span, refused=True)

    def _judge(self, span: Span, *, refused: bool = False) -> None:
        first, last = span
        ok = False
        if not refused:
            members = [self._held[s] for s in range(first, last + 1)]
            ok = self.keys.verify_batch(
                first, [(m.subject, m.data) for m in members], members[-1].sig
            )
        for s in range(first, last + 1):
            held = self._held.get(s)
            if held is not None and held.span == span:
                del self._held[s]
                self._verdicts[s] = ok
        del self._members[span]


class InOrder:
    """Releases ``(seq, item, verified)`` in stream order as each batch completes.

    Feed every message of a sequential read (``push``); what comes back is in sequence order,
    each message once.  A read may begin inside a batch (a follower resuming after the event it
    folded last): ``missing`` names the batch's messages from before the read, which the reader
    fetches in order and hands to ``complete`` - only for the first message, so a forged claim
    cannot make a reader fetch what it already read, and a fetched first member that claims
    another batch ends the fetching at once.  A read may end inside a batch: ``beyond`` takes
    what the reader fetched after it.  A follower that goes idle with messages held asks the
    stream for its last sequence (``impossible``).  ``finish`` refuses what is left.
    """

    def __init__(self, keys: LedgerKeys) -> None:
        self.verifier = BatchVerifier(keys)
        self._items: dict[int, object] = {}
        self._order: list[int] = []  # sequences pushed and not released, ascending
        self._first: int | None = None  # the read's first sequence
        self._before: list[int] = []  # what the first message's batch needs from before the read
        self._fetched: list[int] = []

    def push(
        self, seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None, item: object
    ) -> list[tuple[int, object, bool]]:
        """Offer one message of the read and take what is decided now, in order."""
        self.verifier.offer(seq, subject, data, headers)
        self._items[seq] = item
        bisect.insort(self._order, seq)
        if self._first is None:
            self._first = seq
            self._before = [s for s in self.verifier.missing(seq) if s < seq]
        if not self.missing():
            self.verifier.settle(seq)
        return self._release()

    def missing(self) -> list[int]:
        """The messages from before the read that its first message's batch still needs:
        fetch each, in order, and hand it to ``complete`` (or to ``lost`` if the stream no
        longer has it); empty once that batch is judged."""
        if self._before and (self._first is None or self.verifier.span_of(self._first) is None):
            self._before = []  # judged (a fetched member claimed another batch, say)
            if self._order:
                self.verifier.settle(self._order[-1])
        return list(self._before)

    def complete(
        self, seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None
    ) -> list[tuple[int, object, bool]]:
        """A message from before the read, fetched to complete the batch its first message
        belongs to: judged with that batch, not handed out."""
        self.verifier.offer(seq, subject, data, headers)
        self._fetched.append(seq)
        return self.lost(seq)

    def lost(self, seq: int) -> list[tuple[int, object, bool]]:
        """A message the read needed from before it is gone (or fetched: ``complete``)."""
        if seq in self._before:
            self._before.remove(seq)
            if not self._before and self._order:
                self.verifier.settle(self._order[-1])
        self.missing()
        return self._release()

    def beyond(
        self, seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None
    ) -> list[tuple[int, object, bool]]:
        """A message after the read's end, fetched (in order) to complete the batches the read
        ended inside: judged as the read would have, not handed out."""
        self.verifier.offer(seq, subject, data, headers)
        self._fetched.append(seq)
        self.verifier.settle(seq)
        return self._release()

    def impossible(self, stored_last: int) -> list[tuple[int, object, bool]]:
        """The stream ends at ``stored_last``: a batch claimed to end after it was never
        appended whole (``BatchVerifier.impossible``)."""
        self.verifier.impossible(stored_last)
        return self._release()

    def waiting_for(self) -> int | None:
        """The last sequence of the batches unreleased messages wait for (``None``: none)."""
        ends = [self.verifier.span_end(seq) for seq in self._order]
        return max((end for end in ends if end is not None), default=None)

    def finish(self) -> list[tuple[int, object, bool]]:
        """The read ended: judge what is left (a batch that never completed is refused)."""
        if self._order:
            self.verifier.settle(self._order[-1] + MAX_SPAN)
        return self._release()

    def _release(self) -> list[tuple[int, object, bool]]:
        out: list[tuple[int, object, bool]] = []
        while self._order:
            head = self._order[0]
            verdict = self.verifier.pop(head)
            if verdict is None:
                break
            self._order.pop(0)
            out.append((head, self._items.pop(head), verdict))
        if self._fetched:
            self._fetched = [s for s in self._fetched if self.verifier.pop(s) is None]
        return out


# -- the readers' side of fetching ------------------------------------------------------------
def _parts(msg: Stored) -> tuple[str, bytes, Mapping[str, str] | None]:
    return msg.subject or "", msg.data or b"", msg.headers


async def judged_in_order(
    order: InOrder, seq: int, msg: Stored, fetch: Fetch
) -> list[tuple[int, object, bool]]:
    """Push one message of a sequential read; fetch what its batch needs from before the read
    (only for the read's first message).  What is decided now, in order (``InOrder``)."""
    judged = order.push(seq, *_parts(msg), msg)
    for before in order.missing():
        if before not in order.missing():
            continue  # judged meanwhile (a fetched member claimed another batch)
        raw = await fetch(before)
        judged += order.lost(before) if raw is None else order.complete(before, *_parts(raw))
    return judged


async def judged_beyond(
    order: InOrder, target: int, fetch: Fetch
) -> list[tuple[int, object, bool]]:
    """A read that ended at ``target``, inside a batch: fetch after it, in order, what that
    batch needs, then refuse whatever is still undecided (``InOrder.finish``)."""
    judged: list[tuple[int, object, bool]] = []
    after = target
    while (last := order.waiting_for()) is not None and after < min(last, target + MAX_SPAN):
        after += 1
        raw = await fetch(after)
        if raw is None:  # the stream ends here: no batch that ends later was appended
            judged += order.impossible(after - 1)
            break
        judged += order.beyond(after, *_parts(raw))
    return judged + order.finish()


class OneAtATime:
    """Verdicts for a reader that handles one ledger message at a time and cannot hold it
    until the rest of its batch has arrived (the notifier's durable consumer acknowledges each
    message once handled).  Always True without keys (an unsigned ledger).

    When a message's batch is not complete, the rest of it is fetched by sequence - its
    claimed last message first (a batch is stored whole, so a claimed end the stream does not
    have is a forgery, refused after one fetch), then the others in order, stopping as soon as
    the message is judged - and the verdicts of the others are kept until they are delivered.
    Members before the message are fetched only for the first message this reader meets (it
    may start inside a batch); later, a batch's earlier members were delivered, and the whole
    batch judged, before it.  Verdicts of sequences this reader has passed are dropped.
    """

    def __init__(self, keys: LedgerKeys | None, fetch: Fetch) -> None:
        self.verifier = BatchVerifier(keys) if keys is not None else None
        self.fetch = fetch
        self._floor: int | None = None

    async def accepted(self, seq: int, msg: Stored) -> bool:
        verifier = self.verifier
        if verifier is None:
            return True
        if self._floor is None:
            self._floor = seq
        verdict = verifier.pop(seq)
        if verdict is None:
            verifier.offer(seq, *_parts(msg))
            span = verifier.span_of(seq)
            if span is not None:
                await self._complete(seq, span)
            verdict = bool(verifier.pop(seq))
        verifier.forget_below(seq)
        return verdict

    async def _complete(self, seq: int, span: Span) -> None:
        verifier = self.verifier
        assert verifier is not None
        first, last = span
        if first < seq and seq != self._floor:
            verifier.refuse(span)  # its earlier members came first and were judged with it
            return
        wanted = sorted(verifier.missing(seq), key=lambda s: (s != last, s))
        for other in wanted:
            if verifier.span_of(seq) is None:
                break  # judged
            raw = await self.fetch(other)
            if raw is None:
                verifier.refuse(span)
                break
            verifier.offer(other, *_parts(raw))
        if verifier.span_of(seq) == span:
            verifier.refuse(span)  # not complete with everything the stream has: no batch
