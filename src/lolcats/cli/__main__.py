"""``python -m lolcats.cli`` (what launchers such as torchrun run)."""

from . import app

app()
