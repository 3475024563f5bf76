"""The binder service: topology index folded from the ledger, CP-SAT placement on request."""

__version__ = "0.1.0"
