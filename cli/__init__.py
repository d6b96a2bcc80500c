"""The command line: the top layer, where params, environment and exit codes meet (`python -m distilflow ...`)."""

from cli.main import main

__all__ = ["main"]
