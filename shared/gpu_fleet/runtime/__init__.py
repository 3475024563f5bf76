"""Adapters shared by the four services: NATS connection, the ledger stream, actors, clocks.

Everything here does I/O; the decisions it carries out live in ``gpu_fleet.core``.
"""
