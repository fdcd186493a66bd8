"""Reading the project's YAML files (dataset cards, sweep specs) with errors that name the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: Path, what: str, error: type[Exception]) -> Any:
    """Parsed YAML of `path`; unreadable or invalid files raise `error` naming `what` and the path."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise error(f"{what} {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise error(f"{what} {path}: not valid YAML ({err})") from None
