"""Signing secrets, resolved when a request is signed - never stored in the ledger.

A channel's ``secretRef`` names one place:

* ``env``: an environment variable of the notifier process (local mode);
* ``file``: a file the notifier can read (local mode; surrounding whitespace is stripped);
* ``name`` + ``key``: a Kubernetes Secret in the channel's namespace.  The notifier reads it
  from ``<secrets dir>/<namespace>/<name>/<key>`` (``--secrets-dir``), which is how a pod sees a
  mounted Secret; without a secrets dir such a channel cannot be signed and its deliveries fail
  (retried, then dead-lettered) with "secret unavailable".

Secrets are read at every attempt (no cache), so a rotated file or Secret takes effect at once
and a missing one is a retryable failure the team can fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gpu_fleet.core.model import NotificationChannel


class SecretUnavailableError(RuntimeError):
    """The secret a channel names cannot be read; the message says where it was looked for."""


class SecretResolver:
    def __init__(
        self, secrets_dir: str | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.secrets_dir = Path(secrets_dir) if secrets_dir else None
        self.environ = environ if environ is not None else os.environ

    def resolve(self, channel: NotificationChannel) -> bytes | None:
        """The secret's bytes, ``None`` for a channel without ``secretRef`` (NATS only)."""
        ref = channel.spec.secret_ref
        if ref is None:
            return None
        if ref.env:
            value = self.environ.get(ref.env)
            if not value:
                raise SecretUnavailableError(f"environment variable {ref.env} is not set")
            return value.encode()
        if ref.file:
            return _read(Path(ref.file), f"file {ref.file}")
        if ref.name:
            if self.secrets_dir is None:
                raise SecretUnavailableError(
                    f"Secret {channel.metadata.namespace}/{ref.name}: no --secrets-dir"
                )
            path = self.secrets_dir / channel.metadata.namespace / ref.name / ref.key
            return _read(path, f"Secret {channel.metadata.namespace}/{ref.name} key {ref.key}")
        raise SecretUnavailableError("secretRef names no place")


def _read(path: Path, what: str) -> bytes:
    try:
        value = path.read_bytes().strip()
    except OSError as exc:
        raise SecretUnavailableError(f"{what}: {exc.strerror or type(exc).__name__}") from exc
    if not value:
        raise SecretUnavailableError(f"{what} is empty")
    return value
