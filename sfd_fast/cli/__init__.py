"""The ``sfd-fast`` command: one module per command group, a thin ``main``."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
