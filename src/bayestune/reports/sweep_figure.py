"""The sweep's own figure (``bayestune sweep``): not part of a workflow run's report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bayestune.reports.figures import _save, plt, sns
from bayestune.reports.tables import PathLike
from bayestune.sweep import complete_seeds


def plot_sweep(table: pd.DataFrame, path: PathLike) -> Path:
    """Validation score of each sweep run, averaged over tasks per seed (bars: mean over seeds,
    ticks: 95% interval); runs of other methods in a second colour. Only seeds that every run
    finished enter, so that the bars compare like with like."""
    data = complete_seeds(table)
    per_seed = data.groupby(["name", "method", "seed"], as_index=False)["val_score"].mean()
    per_seed["val score (x100, task mean)"] = per_seed["val_score"] * 100
    per_seed["kind"] = per_seed["method"].map(
        lambda m: "bayestune" if m == "bayestune" else "other method")
    order = (per_seed.groupby("name")["val score (x100, task mean)"].mean()
             .sort_values(ascending=False).index)
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(order) + 1.2))
    sns.barplot(data=per_seed, y="name", x="val score (x100, task mean)", hue="kind",
                order=order, dodge=False, ax=ax, errorbar=("ci", 95))
    ax.set_ylabel("")
    ax.set_title(f"validation, seeds {', '.join(str(s) for s in sorted(data['seed'].unique()))}")
    return _save(fig, path)
