"""The pack's version, in a module of its own so that code inside the pack reads it without importing the root."""
__version__ = "0.1.0"
