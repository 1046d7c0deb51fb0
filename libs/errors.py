"""Errors shared across layers. Backend adapters raise these; the app shell turns them into one-line exits."""

from __future__ import annotations


class BackendConfigError(ValueError):
    """A backend URL that cannot be used, or a backend that cannot be reached at start-up; the message is one
    line meant for the operator."""
