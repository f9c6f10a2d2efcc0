"""`python -m decodetune` (also the torchrun entry point)."""

from decodetune.cli.main import entry

entry()
