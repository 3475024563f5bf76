"""docs/notifications.md's verifier snippet is code: it runs here against signed requests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gpu_fleet_notifier import signing

DOC = Path(__file__).resolve().parents[2] / "docs" / "notifications.md"


def _verifier() -> Callable[..., bool]:
    text = DOC.read_text()
    start = text.index("```python\n", text.index("A verifier with the standard library only"))
    code = text[start + len("```python\n") : text.index("```", start + 3)]
    scope: dict[str, object] = {}
    exec(compile(code, str(DOC), "exec"), scope)  # our own documentation, run as written
    verify = scope["verify"]
    assert callable(verify)
    return verify


def test_the_documented_verifier_accepts_what_the_notifier_signs() -> None:
    verify = _verifier()
    body = b'{"id": "1:run-admitted:rai/train", "event": "run-admitted"}'
    now = int(time.time())
    header = signing.sign(b"team-secret", now, body)
    assert verify(b"team-secret", header, body)
    assert not verify(b"team-secret", header, body + b" ")  # tampered body
    assert not verify(b"other-secret", header, body)  # wrong secret
    assert not verify(b"team-secret", signing.sign(b"team-secret", now - 301, body), body)
    rotating = f"{header},v1={'0' * 64}"
    assert verify(b"team-secret", rotating, body)
