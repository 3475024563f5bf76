"""The notifier service: ledger events and upcoming deadlines as per-team notifications."""

__version__ = "0.1.0"
