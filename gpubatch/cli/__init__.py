"""The `gpubatch` command and the built-in demo."""

from gpubatch.cli.main import main

__all__ = ["main"]
