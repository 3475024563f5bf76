"""Signed ledger events: only the holder of the ledger's private key can write the truth.

NATS permissions already let only the manager publish on ``fleet.ledger.>``; this is the second
wall, for the event that arrives anyway (a mis-configured account, a leaked admin password, a
NATS operator with a shell).  Every atomic batch the manager appends carries one Ed25519
signature, on its last message (``Fleet-Ledger-Sig``), over its span of stream sequences and a
digest of every message's sequence, subject and payload (``batch_bytes``; every message names
the span in ``Fleet-Ledger-Batch``).  Every reader (the manager's own rebuild, the binder,
forecaster, notifier and the Kubernetes bridge) holds only the *public* key and skips, with a
logged error, any message whose batch does not verify (``runtime.ledger_verifier``) - so a
forged event changes no state, and all readers skip the same sequences, so they keep agreeing.
Ledgers written before batch signatures carry one signature per event, over
``<stream sequence>\\n<subject>\\n<payload>``; those still verify one by one.

Why one signature per batch: verifying an Ed25519 signature costs about 0.1 ms here, and a
follower paid it for every event - half its CPU in a burst of admissions, and most of a
rebuild.  A batch is tens of events; its digest costs microseconds.

Why the sequence is signed: a *replayed* event or batch (valid messages copied and published
again) lands at later sequences than the ones it was signed for, so it fails too.  The manager knows
each event's sequence before publishing because it appends atomic batches guarded by the
expected last sequence (``LedgerStream.append``): event ``i`` of a batch after ``last`` is at
``last + i`` or the whole batch is refused.

Why Ed25519 and not an HMAC: with a shared secret every reader could also sign; with a key pair
only the manager can.  Keys are PEM files; ``GPU_FLEET_LEDGER_KEY`` names the manager's private
key, ``GPU_FLEET_LEDGER_PUBLIC_KEY`` the readers' public key (docs/security.md).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

HEADER = "Fleet-Ledger-Sig"
BATCH_HEADER = "Fleet-Ledger-Batch"
PRIVATE_ENV = "GPU_FLEET_LEDGER_KEY"
PUBLIC_ENV = "GPU_FLEET_LEDGER_PUBLIC_KEY"


class LedgerKeyError(ValueError):
    """A key file is missing or is not an Ed25519 PEM key."""


def _signed_bytes(seq: int, subject: str, data: bytes) -> bytes:
    return f"{seq}\n{subject}\n".encode() + data


def batch_bytes(first: int, messages: Sequence[tuple[str, bytes]]) -> bytes:
    """What a batch signature covers: its span, and a digest of each message's sequence,
    subject and payload (length-framed, so no two batches frame to the same bytes)."""
    digest = hashlib.sha256()
    for seq, (subject, data) in enumerate(messages, start=first):
        digest.update(f"{seq}\n{subject}\n{len(data)}\n".encode())
        digest.update(data)
    last = first + len(messages) - 1
    return f"gpu-fleet ledger batch\n{first} {last}\n".encode() + digest.digest()


@dataclass(frozen=True)
class LedgerKeys:
    """The public key every reader verifies with, and the private key only the manager has."""

    public: Ed25519PublicKey
    private: Ed25519PrivateKey | None = None

    @property
    def can_sign(self) -> bool:
        return self.private is not None

    def sign(self, seq: int, subject: str, data: bytes) -> str:
        if self.private is None:
            raise LedgerKeyError("this process holds no ledger private key: it cannot append")
        return base64.b64encode(self.private.sign(_signed_bytes(seq, subject, data))).decode()

    def sign_batch(self, first: int, messages: Sequence[tuple[str, bytes]]) -> str:
        """One signature for an atomic batch whose first message lands at ``first``
        (``runtime.ledger_verifier``)."""
        if self.private is None:
            raise LedgerKeyError("this process holds no ledger private key: it cannot append")
        return base64.b64encode(self.private.sign(batch_bytes(first, messages))).decode()

    def verify_batch(
        self, first: int, messages: Sequence[tuple[str, bytes]], sig: str | None
    ) -> bool:
        """True when ``sig`` signs exactly these messages at sequences ``first``, ``first+1``..."""
        if not sig or not messages:
            return False
        try:
            self.public.verify(base64.b64decode(sig, validate=True), batch_bytes(first, messages))
        except (InvalidSignature, ValueError):
            return False
        return True

    def verify(
        self, seq: int, subject: str, data: bytes, headers: Mapping[str, str] | None
    ) -> bool:
        """True when the message carries a valid signature for this sequence and subject."""
        sig = (headers or {}).get(HEADER)
        if not sig:
            return False
        try:
            self.public.verify(
                base64.b64decode(sig, validate=True), _signed_bytes(seq, subject, data)
            )
        except (InvalidSignature, ValueError):
            return False
        return True

    def reader(self) -> LedgerKeys:
        """The same keys without the private half (what a follower is given)."""
        return LedgerKeys(self.public)

    # -- files -----------------------------------------------------------------------------
    @classmethod
    def generate(cls) -> LedgerKeys:
        private = Ed25519PrivateKey.generate()
        return cls(private.public_key(), private)

    def write(self, private_path: Path | None, public_path: Path) -> None:
        """Write the PEM files (the private one readable by its owner only)."""
        public_path.write_bytes(
            self.public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        if private_path is not None and self.private is not None:
            data = self.private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)

    @classmethod
    def load(cls, private_path: str | None = None, public_path: str | None = None) -> LedgerKeys:
        """From a private key file (the public half is derived) or a public key file."""
        if private_path:
            private = _read(private_path, "private")
            if not isinstance(private, Ed25519PrivateKey):
                raise LedgerKeyError(f"{private_path}: not an Ed25519 private key")
            return cls(private.public_key(), private)
        if public_path:
            public = _read(public_path, "public")
            if not isinstance(public, Ed25519PublicKey):
                raise LedgerKeyError(f"{public_path}: not an Ed25519 public key")
            return cls(public)
        raise LedgerKeyError("no ledger key file given")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LedgerKeys | None:
        """Keys named by ``GPU_FLEET_LEDGER_KEY`` / ``GPU_FLEET_LEDGER_PUBLIC_KEY``; ``None``
        when neither is set (an unsigned ledger: development without the security profile)."""
        env = os.environ if env is None else env
        private, public = env.get(PRIVATE_ENV), env.get(PUBLIC_ENV)
        if not private and not public:
            return None
        return cls.load(private or None, public or None)


def _read(path: str, what: str) -> object:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LedgerKeyError(f"{path}: cannot read the ledger {what} key: {exc.strerror}") from exc
    try:
        if what == "private":
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise LedgerKeyError(f"{path}: not a PEM {what} key") from exc
