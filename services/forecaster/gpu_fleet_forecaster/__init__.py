"""The forecaster service: "when will this run start, and what would make it sooner?"."""

__version__ = "0.1.0"
