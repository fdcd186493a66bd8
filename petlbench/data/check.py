"""`petlbench datasets check`: everything wrong with a dataset, found without training on it."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from petlbench.data.discover import (
    Log,
    assign_splits,
    find_leakage,
    leakage_lines,
    survey,
    too_few_classes_message,
)
from petlbench.data.source import SPLITS, DatasetError, printable


@dataclass
class CheckReport:
    """What `check_dataset` found; `ok` is True only when nothing at all is wrong."""

    spec: str
    name: str = ""
    root: str = ""
    layout: str = ""
    split_origin: str = ""
    classes: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # {split: {class: readable images}}
    bad_files: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    empty_classes: list[str] = field(default_factory=list)  # classes without a single readable image
    missing: dict[str, list[str]] = field(default_factory=dict)  # {split: classes absent from it}
    leaks: list[dict[str, Any]] = field(default_factory=list)  # identical files in several splits: {sha256, files}
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # it could not be opened (no `layout`), or cannot be trained on

    @property
    def ok(self) -> bool:
        """No errors, bad files, empty classes, classes missing from a split or leakage across splits."""
        return not (self.errors or self.bad_files or self.empty_classes or any(self.missing.values()) or self.leaks)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for --json), `ok` included."""
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def to_text(self) -> str:
        """A readable report: header, class-count table per split, then every problem."""
        lines = [f"dataset {self.name or self.spec}" + (f" at {self.root}" if self.root else "")]
        if self.errors and not self.layout:
            lines += [f"ERROR: {e}" for e in self.errors]
            return "\n".join(lines)
        lines.append(f"layout: {self.layout}; split: {self.split_origin}; {len(self.classes)} classes")
        width = max([len("class"), len("total"), *(len(c) for c in self.classes)])
        header = f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS) + f"  {'total':>6}"
        lines += ["", header, "-" * len(header)]
        for name in self.classes:
            row = [self.counts.get(s, {}).get(name, 0) for s in SPLITS]
            flags = [" <- empty class"] if name in self.empty_classes else []
            flags += [
                f" <- not in {s}" for s in SPLITS if name in self.missing.get(s, []) and name not in self.empty_classes
            ]
            lines.append(f"{name:<{width}}  " + "  ".join(f"{n:>6}" for n in row) + f"  {sum(row):>6}" + "".join(flags))
        totals = [sum(self.counts.get(s, {}).values()) for s in SPLITS]
        lines += [
            "-" * len(header),
            f"{'total':<{width}}  " + "  ".join(f"{n:>6}" for n in totals) + f"  {sum(totals):>6}",
        ]
        if self.bad_files:
            lines += ["", f"{len(self.bad_files)} unreadable file(s):"]
            lines += [f"  {b['path']}: {b['reason']}" for b in self.bad_files]
        if self.empty_classes:
            lines += ["", f"empty class(es): {', '.join(self.empty_classes)}"]
        for split in SPLITS:
            if self.missing.get(split):
                lines.append(f"classes missing from {split}: {', '.join(self.missing[split])}")
        if self.leaks:
            lines += ["", f"{len(self.leaks)} image(s) with identical copies in more than one split (leakage):"]
            lines += [f"  {line}" for line in leakage_lines(self.leaks, limit=len(self.leaks))]
        if self.errors:
            lines += ["", *[f"ERROR: {e}" for e in self.errors]]
        if self.warnings:
            lines += ["", *[f"warning: {w}" for w in self.warnings]]
        lines += ["", "OK" if self.ok else "PROBLEMS FOUND"]
        return "\n".join(lines)


def check_dataset(
    spec: str | Path | None, seed: int = 0, split_dir: Path | None = None, log: Log | None = None
) -> CheckReport:
    """Decode every image of `spec` and report bad files, empty classes, classes missing from a split, fewer than two
    classes, identical files in more than one split (leakage, with the files) and counts.

    Never raises for a dataset problem: a dataset that cannot be opened comes back with `errors` set. A layout
    without an official split is reported with the stratified 70/10/20 split training would draw (`seed`), read
    from `split_dir/split.csv` when that matches; nothing is written except the per-file verdict cache.
    """
    report = CheckReport(spec=str(spec) if spec is not None else "(embedded synthetic)")
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message.removeprefix("warning: "))
        if log is not None:
            log(message)

    try:
        found = survey(spec, split_dir, log=log or (lambda _m: None))
    except DatasetError as err:
        report.errors.append(str(err))
        return report
    inv = found.inventory
    report.name, report.root, report.layout = inv.name, printable(inv.root), inv.layout
    report.classes = list(inv.classes)
    report.bad_files = found.bad
    warnings.extend(printable(n) for n in inv.notes)
    good = found.good
    per_class = Counter(e.label for e in good)
    report.empty_classes = [c for c in inv.classes if per_class[c] == 0]
    splits, origin = assign_splits(inv, good, seed, split_dir, log=note, write=False) if good else ({}, "")
    report.split_origin = origin
    report.counts = {s: dict.fromkeys(inv.classes, 0) for s in SPLITS}
    for entry in good:
        report.counts[splits[entry.path]][entry.label] += 1
    for split in SPLITS:
        report.missing[split] = [
            c for c in inv.classes if c not in report.empty_classes and report.counts[split][c] == 0
        ]
    usable = [c for c in inv.classes if per_class[c] > 0]
    if len(usable) < 2:
        report.errors.append(too_few_classes_message(inv.root, usable, per_class))
    report.leaks, duplicate_notes = find_leakage(good, found.checks, splits, inv.root)
    warnings.extend(duplicate_notes)
    if inv.card is not None and inv.card.num_classes != len(inv.classes):
        warnings.append(f"card {inv.card.key!r} expects {inv.card.num_classes} classes, found {len(inv.classes)}")
    report.warnings = warnings
    return report
