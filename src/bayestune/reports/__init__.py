"""Tables and figures of a benchmark run, from the files the pipeline writes.

* :mod:`~bayestune.reports.tables`: the score tables, the published rows beside them, the
  paired differences and the candidates of the fair protocol (``bayestune report``).
* :mod:`~bayestune.reports.provenance`: where every run of a table came from, and a warning
  when they mix code or software (``bayestune report``).
* :mod:`~bayestune.reports.figures`: every figure (``bayestune figures`` and ``diagnose
  --figures-dir``); matplotlib and seaborn load only when a figure is asked for.
* :mod:`~bayestune.reports.sweep_figure`: the sweep's figure (``bayestune sweep``).

Every file goes through :func:`bayestune.files.atomic_output`, so a killed report never
leaves half a table behind. The names of the submodules are re-exported here.
"""

from __future__ import annotations

import importlib
from typing import Any

from bayestune.reports.provenance import (
    PROVENANCE_FIELDS,
    collect_provenance,
    provenance_problems,
    write_provenance,
)
from bayestune.reports.tables import (
    DAGGER,
    FIXED_BUDGET,
    FIXED_METHODS,
    GLUE_TASKS,
    IMPROVING_SUFFIX,
    METHOD_ORDER,
    NOT_RUN,
    PUBLISHED_BUDGET,
    PUBLISHED_GLUE,
    PUBLISHED_MODEL,
    PathLike,
    budget_label,
    collect_scores,
    is_published_model,
    make_table,
    paired_table,
    published_note,
    published_rows,
    read_paired,
    with_published_rows,
    write_selection,
    write_table_csv,
    write_table_html,
    write_tables,
)

_FIGURES = frozenset({
    "MODULE_TYPES", "collect_histories", "mask_locations", "parameter_location",
    "plot_lambda_histogram", "plot_lambda_traces", "plot_mask_locations", "plot_mask_overlap",
    "plot_paired_differences", "plot_score_vs_budget", "plot_seed_agreement", "plot_val_curves",
    "write_figures"})

__all__ = [
    "DAGGER", "FIXED_BUDGET", "FIXED_METHODS", "GLUE_TASKS", "IMPROVING_SUFFIX", "METHOD_ORDER",
    "NOT_RUN", "PROVENANCE_FIELDS", "PUBLISHED_BUDGET", "PUBLISHED_GLUE", "PUBLISHED_MODEL",
    "PathLike", "budget_label", "collect_provenance", "collect_scores", "is_published_model",
    "make_table", "paired_table", "plot_sweep", "provenance_problems", "published_note",
    "published_rows", "read_paired", "with_published_rows", "write_provenance",
    "write_selection", "write_table_csv", "write_table_html", "write_tables", *sorted(_FIGURES),
]


def __getattr__(name: str) -> Any:
    # The figures import matplotlib and seaborn (a second of start-up), which a table does not
    # need. The import is spelled out, so the workflow's code hash of `report` covers the
    # figures too; the sweep's figure is loaded by name: no report rule runs it, and it reads
    # the sweep module.
    if name in _FIGURES:
        from bayestune.reports import figures

        return getattr(figures, name)
    if name == "plot_sweep":
        return importlib.import_module("bayestune.reports.sweep_figure").plot_sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
