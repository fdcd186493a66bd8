"""Reports: the papers' tables (Markdown, LaTeX, CSV) and figures (PNG, PDF) built from stored runs.

`build_report(results_dir, out_dir)` writes everything the stored runs allow and returns `index.md`'s path.
Modules: `collect` (runs → DataFrame, cell rules), `efficiency` (PPE/PME), `model` + `tables` (table
builders), `bootstrap` (Table CI: bootstrap CIs of test AUC, paired tests against FPT+), `render`
(Markdown/LaTeX/CSV), `figures` (matplotlib), `introspection` (Figures 6/9 arrays), `build` (the report and its
index).
"""

from petlbench.reports.build import build_report, parse_gpu_mem
from petlbench.reports.efficiency import pme, ppe
from petlbench.reports.introspection import introspection_arrays, load_introspection, save_introspection

__all__ = [
    "build_report",
    "introspection_arrays",
    "load_introspection",
    "parse_gpu_mem",
    "pme",
    "ppe",
    "save_introspection",
]
