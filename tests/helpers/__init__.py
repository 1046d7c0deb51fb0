"""Helpers shared by test packages (test modules import these, never each other)."""
