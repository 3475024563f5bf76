"""The manager service: the fleet API and the ledger's single writer."""

__version__ = "0.1.0"
