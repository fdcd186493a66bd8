"""What every command shares: the consoles, the one-line error exit, the user-error types, flag checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

if TYPE_CHECKING:
    from petlbench.core.config import Amp, Attention

# Help texts of the options several commands share, worded once.
OPT_HELP = "Method option METHOD.KEY=VALUE (repeatable)."
DEVICE_HELP = "auto, cpu, cuda or cuda:N."
PRETRAINED_HELP = "Load timm's hub weights for the backbone."
WEIGHTS_HELP = "Local .safetensors / PyTorch checkpoint for the backbone."
JSON_HELP = "Machine-readable output."
JOBS_HELP = "Worker processes, one method each at a time; 0: one per CPU core, at most 4."
LOG_TO_HELP = (
    "Experiment tracker fed each epoch's history (off by default): tensorboard, written to "
    "RESULTS/<run id>/tensorboard/; needs pip install 'petlbench[tracking]'."
)

# Redirected output (a SLURM log, CI) gets no live views, and lines and tables are never cut at 80 columns.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
if not console.is_terminal:
    console.width = err_console.width = 1000


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


def plain_log(target: Console) -> Callable[[str], None]:
    """A log function printing on `target` exactly what it is given: error text, paths and options can hold
    brackets ("[/x]") that console markup would read as tags (and abort on)."""

    def log(message: str) -> None:
        target.print(message, markup=False, highlight=False, soft_wrap=True)

    return log


def progress_log() -> Callable[[str], None]:
    """Where long commands report each finished piece of work as one plain line: stderr, so that stdout keeps
    only the result (a table, or JSON for --json) and a redirected log shows the work while it goes on."""
    return plain_log(err_console)


def fail(message: str) -> NoReturn:
    """Print an error and exit with status 2."""
    # soft_wrap: file paths in the message must stay whole (greppable, copyable); no markup in user text
    err_console.print("[bold red]error:[/bold red] ", end="")
    err_console.print(message, markup=False, soft_wrap=True)
    raise typer.Exit(2)


def check_attention(attention: str) -> Attention:
    """`attention` as a known attention kernel; exits with a clear error otherwise."""
    from petlbench.backbones.attention import ATTENTION_CHOICES

    if attention in ATTENTION_CHOICES:
        return attention
    fail(f"--attention {attention!r}: use {', '.join(ATTENTION_CHOICES)}")


def size_flag(flag: str, value: str | None) -> int | str | None:
    """A resolution or batch-size flag: an integer, 'auto' (the planner chooses), or None (not given)."""
    if value is None or value.strip().lower() == "auto":
        return None if value is None else "auto"
    try:
        return int(value)  # its range is checked with the other run values
    except ValueError:
        fail(f"{flag} {value!r}: give a positive integer or 'auto'")


def check_amp(amp: str) -> Amp:
    """`amp` as a known autocast mode; exits with a clear error otherwise."""
    from petlbench.sweep.spec import AMP_CHOICES

    if amp in AMP_CHOICES:
        return amp
    fail(f"--amp {amp!r}: use {' or '.join(AMP_CHOICES)}")


def check_log_to(log_to: str | None) -> tuple[str, ...]:
    """The comma-separated trackers of `--log-to`, known and installed; exits with a clear error otherwise."""
    from petlbench.reports.tracker import TrackerError, check_trackers

    names = [name.strip() for name in (log_to or "").split(",") if name.strip()]
    try:
        return check_trackers(names)
    except TrackerError as err:
        fail(str(err))
