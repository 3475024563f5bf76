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
from collections.abc import Mapping
from dataclasses import dataclass

from gpu_fleet.runtime.ledger_keys import BATCH_HEADER, HEADER, LedgerKeys

MAX_SPAN = 10_000
"""The longest batch a reader waits to complete (the manager's batches stay far below it:
``FLUSH_AT`` events plus one decision; JetStream caps atomic batches too)."""

Span = tuple[int, int]


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
        self._spans: dict[int, set[Span]] = {}  # last sequence -> spans waiting for it

    def offer(self, seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None) -> None:
        if seq in self._verdicts or seq in self._held:
            return
        span = claimed_span(headers)
        sig = (headers or {}).get(HEADER)
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
        self._spans.setdefault(last, set()).add(span)
        self._judge(span)

    def verdict(self, seq: int) -> bool | None:
        """True (verified), False (refused) or None (its batch is not complete yet)."""
        return self._verdicts.get(seq)

    def pop(self, seq: int) -> bool | None:
        """``verdict``, forgotten once decided (a long-lived reader keeps nothing)."""
        return self._verdicts.pop(seq, None)

    def span_end(self, seq: int) -> int | None:
        """The last sequence of the batch ``seq`` waits for (``None``: not waiting)."""
        held = self._held.get(seq)
        return held.span[1] if held is not None else None

    def missing(self, seq: int) -> list[int]:
        """Sequences of the span ``seq`` claims that were never offered (a reader that started
        inside the batch fetches them, then offers them)."""
        held = self._held.get(seq)
        if held is None:
            return []
        first, last = held.span
        return [
            s for s in range(first, last + 1) if s not in self._held and s not in self._verdicts
        ]

    def settle(self, through: int) -> None:
        """Refuse every message whose claimed span ends at or before ``through`` and is still
        not complete: a reader that has passed a span's end will never complete it."""
        for last in [k for k in self._spans if k <= through]:
            for span in sorted(self._spans.get(last, ())):
                self._judge(span, final=True)

    def _judge(self, span: Span, *, final: bool = False) -> None:
        first, last = span
        members = [self._held.get(s) for s in range(first, last + 1)]
        complete = all(m is not None for m in members)
        if not complete and not final:
            return
        ok = False
        if complete:
            present = [m for m in members if m is not None]
            ok = all(m.span == span for m in present) and self.keys.verify_batch(
                first, [(m.subject, m.data) for m in present], present[-1].sig
            )
        for s in range(first, last + 1):
            held = self._held.get(s)
            if held is not None and held.span == span:
                del self._held[s]
                self._verdicts[s] = ok
        waiting = self._spans.get(last)
        if waiting is not None:
            waiting.discard(span)
            if not waiting:
                del self._spans[last]


class InOrder:
    """Releases ``(seq, item, verified)`` in stream order as each batch completes.

    Feed every message of a sequential read (``push``); what comes back is in sequence order,
    each message once.  A read may begin inside a batch (a follower resuming after the event it
    folded last): ``missing`` names the batch's messages from before the read, which the reader
    fetches and hands to ``complete`` - only for the first message, so a forged claim cannot
    make a reader fetch what it already read.  ``finish`` refuses what is left when a read ends.
    """

    def __init__(self, keys: LedgerKeys) -> None:
        self.verifier = BatchVerifier(keys)
        self._items: dict[int, object] = {}
        self._order: list[int] = []  # sequences pushed and not released, ascending
        self._started = False
        self._before: list[int] = []  # what the first message's batch needs from before the read
        self._fetched: list[int] = []

    def push(
        self, seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None, item: object
    ) -> list[tuple[int, object, bool]]:
        """Offer one message of the read and take what is decided now, in order."""
        self.verifier.offer(seq, subject, data, headers)
        self._items[seq] = item
        bisect.insort(self._order, seq)
        if not self._started:
            self._started = True
            self._before = [s for s in self.verifier.missing(seq) if s < seq]
        if not self._before:
            self.verifier.settle(seq)
        return self._release()

    def missing(self) -> list[int]:
        """The messages from before the read that its first message's batch needs: fetch each
        and hand it to ``complete`` (or to ``lost`` if the stream no longer has it)."""
        return list(self._before)

    def complete(
        self, seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None
    ) -> list[tuple[int, object, bool]]:
        """A message from before the read, fetched to complete the batch its first message
        belongs to: judged with that batch, not handed out."""
        self.verifier.offer(seq, subject, data, headers)
        self._fetched.append(seq)
        return self.lost(seq)

    def beyond(
        self, seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None
    ) -> list[tuple[int, object, bool]]:
        """A message after the read's end, fetched (in order) to complete the batches the read
        ended inside: judged as the read would have, not handed out."""
        self.verifier.offer(seq, subject, data, headers)
        self._fetched.append(seq)
        self.verifier.settle(seq)
        return self._release()

    def lost(self, seq: int) -> list[tuple[int, object, bool]]:
        """A message the read needed from before it is gone (or fetched: ``complete``)."""
        if seq in self._before:
            self._before.remove(seq)
            if not self._before and self._order:
                self.verifier.settle(self._order[-1])
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
