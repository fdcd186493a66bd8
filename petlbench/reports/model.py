"""The report's table model: cells that remember where their numbers came from, and best/second marking.

A `Table` is a list of `Section`s (e.g. one per pre-trained weights) of `Row`s; every `Cell` carries its
display text, the number used for ranking, the count of runs behind it and their run ids, so the CSV can
trace each printed number back to stored runs. Renderers live in `render.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd

MISSING = "—"  # no finished run for this cell
OOM = "/"  # out of memory (status oom) or above the chosen GPU budget, as in the papers' Table III
NA = "n/a"  # the quantity cannot be measured where the run happened (e.g. power without NVML)

CellStatus = Literal["ok", "oom", "over_budget", "failed", "running", "missing", "na", "undefined"]


@dataclass
class Cell:
    """One table cell: display text plus the value, spread, run count and run ids behind it."""

    text: str = MISSING
    value: float | None = None
    std: float | None = None
    n: int = 0
    status: CellStatus = "missing"
    mark: str = ""  # footnote mark appended after the text (e.g. "†" for an estimated memory figure)
    run_ids: tuple[str, ...] = ()
    source: str = ""  # where the number comes from (e.g. "measured", "estimated", a formula)
    emphasis: Literal["", "best", "second"] = ""

    @property
    def has_value(self) -> bool:
        """True if the cell holds a finite number."""
        return self.value is not None and math.isfinite(self.value)

    @property
    def finite(self) -> float | None:
        """The value if it is a finite number, else None."""
        return self.value if self.value is not None and math.isfinite(self.value) else None


@dataclass(frozen=True)
class Column:
    """A table column: key, header, optional group header, direction of "better", display precision."""

    key: str
    header: str
    better: Literal["max", "min"] | None = None
    decimals: int = 2
    group: str = ""

    @property
    def arrow(self) -> str:
        """The papers' ↑/↓ marker for this column."""
        return {"max": " ↑", "min": " ↓"}.get(self.better or "", "")


@dataclass
class Row:
    """A labelled row; `ranked=False` rows (reference baselines) never receive bold/underline."""

    label: str
    key: str
    cells: dict[str, Cell]
    ranked: bool = True


@dataclass
class Section:
    """A block of rows with an optional heading (e.g. the pre-trained weights)."""

    title: str
    rows: list[Row]


@dataclass
class Table:
    """A report table: identity, caption, columns, sections and footnotes."""

    key: str  # file stem, e.g. "table1_main"
    number: str  # "I", "II", ...
    title: str
    caption: str
    columns: list[Column]
    sections: list[Section]
    notes: list[str] = field(default_factory=list)
    row_header: str = "Method"
    meta: dict[str, Any] = field(default_factory=dict)  # the setting the table was drawn from

    def cells(self) -> list[tuple[Section, Row, Column, Cell]]:
        """Every (section, row, column, cell), in display order."""
        return [
            (section, row, column, row.cells.get(column.key, Cell()))
            for section in self.sections
            for row in section.rows
            for column in self.columns
        ]

    def to_frame(self) -> pd.DataFrame:
        """Long-form data behind the table: one line per cell with value, std, n, status and run ids."""
        records = []
        for section, row, column, cell in self.cells():
            records.append(
                {
                    "table": self.key,
                    "section": section.title,
                    "row": row.label,
                    "row_key": row.key,
                    "column": column.key,
                    "header": column.header,
                    "text": cell.text + cell.mark,
                    "value": cell.value if cell.has_value else None,
                    "std": cell.std,
                    "n_runs": cell.n,
                    "status": cell.status,
                    "source": cell.source,
                    "emphasis": cell.emphasis,
                    "run_ids": ";".join(cell.run_ids),
                }
            )
        return pd.DataFrame.from_records(records)


def highlight(table: Table) -> None:
    """Mark the best cell(s) of every ranked column bold and the second best underlined, per section.

    Values are compared as displayed (rounded to the column's decimals), so ties share the mark; rows with
    `ranked=False` and cells without a number ("—", "/", "n/a") take no part; a column where every ranked
    row ties gets no mark.
    """
    for section in table.sections:
        for column in table.columns:
            if column.better is None:
                continue
            candidates = [
                (round(value, column.decimals), cell)
                for row in section.rows
                if row.ranked and (cell := row.cells.get(column.key)) is not None and (value := cell.finite) is not None
            ]
            for _, cell in candidates:
                cell.emphasis = ""
            distinct = sorted({v for v, _ in candidates}, reverse=column.better == "max")
            if len(candidates) > 1 and len(distinct) == 1:
                continue  # every row ties: nothing stands out
            for value, cell in candidates:
                if value == distinct[0]:
                    cell.emphasis = "best"
                elif len(distinct) > 1 and value == distinct[1]:
                    cell.emphasis = "second"
