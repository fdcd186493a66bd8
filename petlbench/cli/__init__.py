"""The `petlbench` command line: a thin typer layer over functions a notebook can call too."""

from petlbench.cli.root import app, main

__all__ = ["app", "main"]
