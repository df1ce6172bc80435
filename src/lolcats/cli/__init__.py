"""Command line: ``lolcats COMMAND``. Importing the command modules registers them on the app."""

from . import convert, linearize, generate, eval, report, export, bench  # noqa: F401  (registration, in help order)
from .app import app

__all__ = ["app"]

