"""What every command shares: the consoles, the one-line error exit, the user-error types, flag checks."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the request is wrong": shown as one clear message, exit code 2."""
    from petlbench.backbones.vit import BackboneError
    from petlbench.core.config import ConfigError
    from petlbench.core.options import OptionError
    from petlbench.core.registry import RegistryError
    from petlbench.engine.runner import RunRequestError

    errors: list[type[BaseException]] = [BackboneError, ConfigError, OptionError, RegistryError, RunRequestError]
    try:
        from petlbench.data.discover import DatasetError

        errors.append(DatasetError)
    except ImportError:
        pass
    return tuple(errors)


def fail(message: str) -> None:
    """Print an error and exit with status 2."""
    # soft_wrap: file paths in the message must stay whole (greppable, copyable); no markup in user text
    err_console.print("[bold red]error:[/bold red] ", end="")
    err_console.print(message, markup=False, soft_wrap=True)
    raise typer.Exit(2)


def check_attention(attention: str) -> None:
    """Exit with a clear error unless `attention` names a known attention kernel."""
    from petlbench.backbones.attention import ATTENTION_CHOICES

    if attention not in ATTENTION_CHOICES:
        fail(f"--attention {attention!r}: use {', '.join(ATTENTION_CHOICES)}")
