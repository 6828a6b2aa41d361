"""Test support helpers (tiny checkpoint generator)."""
