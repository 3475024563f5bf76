"""msgspec message families exchanged over NATS, one module per family.

Evolution rules (tested in tests/runtime/test_messages.py): new fields get defaults and are
appended; a field's type never changes; wire decoders do not forbid unknown fields, so a rolling
upgrade may add fields; subjects are built by the pure functions in ``subjects``.
"""
