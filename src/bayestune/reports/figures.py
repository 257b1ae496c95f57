"""The figures of a run (PNG, matplotlib's Agg backend): where a mask's scalars sit (per layer
and per module type), score against trainable fraction, the posterior-mean lambda on a log
scale, the Jaccard overlap of the methods' masks, the chain diagnostics (lambda traces, the
seeds' agreement), the validation curves of the runs and a forest plot of the paired
differences; :func:`write_figures` draws every one the given files allow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bayestune import convergence, files, paired  # noqa: E402
from bayestune.errors import ConfigError  # noqa: E402
from bayestune.models.base import is_head  # noqa: E402
from bayestune.reports.tables import (  # noqa: E402
    DAGGER,
    FIXED_BUDGET,
    PathLike,
    _row_order,
    _task_order,
    budget_label,
    read_paired,
)

# --- where the parameters sit -------------------------------------------------------------------
_LAYER = re.compile(r"\.(?:layer|layers|blocks|block|h)\.(\d+)\.")
MODULE_TYPES = ("embeddings", "attn q", "attn k", "attn v", "attn out", "ffn in", "ffn out",
                "layernorm", "pooler", "head", "other")


def parameter_location(name: str) -> tuple[str, str]:
    """(layer, module type) of a parameter name, for BERT/RoBERTa (Hugging Face) and timm ViTs.

    Layer is the block index as a string, ``emb`` for embeddings, ``head`` for the task head and
    ``top`` for what sits above the blocks (final norm, pooler). A fused timm ``qkv`` tensor is
    reported as ``attn qkv``; :func:`mask_locations` splits it into q, k and v by rows.
    """
    if is_head(name):
        return "head", "head"
    lowered = name.lower()
    found = _LAYER.search(name)
    embedding = "embed" in lowered or lowered.endswith(("cls_token", "dist_token", "reg_token"))
    layer = found.group(1) if found else ("emb" if embedding else "top")
    if "layernorm" in lowered or re.search(r"(^|\.)(norm\d*|fc_norm|ln_?\w*)\.", lowered):
        return layer, "layernorm"
    if embedding:
        return layer, "embeddings"
    if "pooler" in lowered:
        return layer, "pooler"
    rules = (
        (r"\.qkv\.", "attn qkv"),
        (r"\.(query|q_proj|q)\.", "attn q"),
        (r"\.(key|k_proj|k)\.", "attn k"),
        (r"\.(value|v_proj|v)\.", "attn v"),
        (r"attention\.output\.dense\.|\.attn\.proj\.|\.(out_proj|o_proj)\.", "attn out"),
        (r"intermediate\.dense\.|\.mlp\.fc1\.|\.fc1\.", "ffn in"),
        (r"\.output\.dense\.|\.mlp\.fc2\.|\.fc2\.", "ffn out"),
    )
    for pattern, module in rules:
        if re.search(pattern, name):
            return layer, module
    return layer, "other"


def mask_locations(mask: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Selected and total scalars per (layer, module type) of one mask."""
    counts: dict[tuple[str, str], list[int]] = {}
    for name, tensor in mask.items():
        layer, module = parameter_location(name)
        flat = tensor.bool()
        if module == "attn qkv" and flat.shape[0] % 3 == 0:
            parts = zip(("attn q", "attn k", "attn v"), flat.chunk(3, dim=0), strict=True)
        else:
            parts = [(module, flat)]
        for part_module, part in parts:
            entry = counts.setdefault((layer, part_module), [0, 0])
            entry[0] += int(part.sum())
            entry[1] += part.numel()
    rows = [(layer, module, sel, tot) for (layer, module), (sel, tot) in counts.items()]
    return pd.DataFrame(rows, columns=["layer", "module", "selected", "total"])


def _layer_key(layer: str) -> tuple[int, int]:
    if layer == "emb":
        return (0, 0)
    if layer.isdigit():
        return (1, int(layer))
    return (2, 0 if layer == "top" else 1)


def _save(fig: plt.Figure, path: PathLike) -> Path:
    path = Path(path)
    with files.atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_mask_locations(masks: Mapping[str, Mapping[str, torch.Tensor]], path: PathLike) -> Path:
    """Fraction of each layer's and each module type's scalars that each mask selects."""
    frames = []
    for label, mask in masks.items():
        frame = mask_locations(mask)
        frame["mask"] = label
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for ax, by in zip(axes, ("layer", "module"), strict=True):
        grouped = data.groupby(["mask", by], as_index=False)[["selected", "total"]].sum()
        grouped["fraction selected"] = grouped["selected"] / grouped["total"]
        order = (sorted(grouped[by].unique(), key=_layer_key) if by == "layer"
                 else [m for m in MODULE_TYPES if m in set(grouped[by])])
        sns.barplot(data=grouped, x=by, y="fraction selected", hue="mask", order=order, ax=ax)
        shown = grouped["fraction selected"][grouped["fraction selected"] > 0]
        if len(shown) and shown.max() > 10 * shown.min():
            ax.set_yscale("log")  # groups span decades; one with nothing selected has no bar
        ax.tick_params(axis="x", rotation=45)
    axes[0].get_legend().remove()
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.02, 1), title="mask")
    axes[0].set_title("per layer (emb = embeddings, top = above the blocks)")
    axes[1].set_title("per module type")
    return _save(fig, path)


# --- scores, scales, overlap --------------------------------------------------------------------
def plot_score_vs_budget(scores: pd.DataFrame, path: PathLike) -> Path:
    """Mean test score (x100) against trainable fraction, one panel per task."""
    mean = scores.groupby(["task", "method", "budget"], as_index=False)[
        ["score", "trainable_fraction"]].mean()
    tasks = _task_order(mean["task"], "vtab" if mean["task"].str.startswith("vtab-").all()
                        else "glue")
    grid = sns.relplot(data=mean, x="trainable_fraction", y="score", hue="method", style="method",
                       col="task", col_order=tasks, col_wrap=min(4, len(tasks)), kind="line",
                       markers=True, dashes=False, height=3, facet_kws={"sharey": False})
    grid.set(xscale="log")
    full = mean[mean["method"] == "full"].set_index("task")["score"]
    for task, ax in grid.axes_dict.items():
        if task in full.index:  # full fine-tuning as the reference line across budgets
            ax.axhline(full[task], color="grey", linestyle=":", linewidth=1)
    grid.set_axis_labels("trainable fraction", "test score (x100)")
    return _save(grid.figure, path)


def plot_lambda_histogram(scales: Mapping[str, Mapping[str, torch.Tensor]], path: PathLike,
                          budget: float | None = 0.005, bins: int = 80) -> Path:
    """Histogram of log10 posterior-mean lambda over every scalar, one colour per scale file.

    With ``budget``, a dashed line marks (to bin precision) the lambda above which BayesTune's
    mask at that budget keeps the scalars. Counted tensor by tensor: a RoBERTa scale file has
    125M values, too many to take the log of in one piece.
    """
    logs = {label: [torch.log10(t.float().clamp_min(1e-12)).reshape(-1) for t in tensors.values()]
            for label, tensors in scales.items()}
    low = min(float(p.min()) for parts in logs.values() for p in parts)
    high = max(float(p.max()) for parts in logs.values() for p in parts)
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, parts in logs.items():
        counts = sum(np.histogram(p.numpy(), bins=edges)[0] for p in parts)
        steps = ax.stairs(counts, edges, label=label, fill=False, linewidth=1.5)
        if budget is not None:
            keep = max(math.floor(budget * counts.sum()), 1)
            from_top = np.cumsum(counts[::-1])  # scalars at or above each bin, top bin first
            cut = edges[bins - 1 - int(np.searchsorted(from_top, keep))]
            ax.axvline(cut, linestyle="--", linewidth=1, color=steps.get_edgecolor())
    ax.set_yscale("log")
    ax.set_xlabel("log10 posterior-mean lambda")
    ax.set_ylabel("scalars")
    title = "posterior-mean scales"
    if budget is not None:
        title += f" (dashed: top {100 * budget:g}% cut)"
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_mask_overlap(masks: Mapping[str, Mapping[str, torch.Tensor]], path: PathLike,
                      title: str = "") -> Path:
    """Jaccard overlap |A & B| / |A | B| between every pair of masks (same model and task)."""
    from bayestune.methods import mask_overlap

    overlap = mask_overlap(masks)
    size = 1.2 + 0.7 * len(overlap)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    sns.heatmap(overlap, annot=True, fmt=".3f", vmin=0, vmax=1, cmap="viridis", square=True,
                ax=ax, cbar_kws={"label": "Jaccard"})
    ax.set_title(title or "mask overlap (Jaccard)")
    return _save(fig, path)


# --- chain diagnostics: lambda traces, agreement across seeds -------------------------------
def plot_lambda_traces(traces: Mapping[str, torch.Tensor], meta: Mapping[str, object],
                       path: PathLike, lines: int = 40, title: str = "") -> Path:
    """max(lambda, floor) of the traced scalars against the step, log scale: ``lines`` of them
    as thin lines over the 5-95% and 25-75% bands and the median; dotted lines at W and B."""
    steps = traces["steps"].numpy()
    values = traces["lambda"].double().numpy()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(steps) == 0:
        plt.close(fig)
        return _empty_figure(path, "no lambda trace recorded")
    bands = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95], axis=1)
    ax.fill_between(steps, bands[0], bands[4], alpha=0.15, color="C0", label="5-95%")
    ax.fill_between(steps, bands[1], bands[3], alpha=0.3, color="C0", label="25-75%")
    ax.plot(steps, values[:, :lines], color="grey", linewidth=0.5, alpha=0.6)
    ax.plot(steps, bands[2], color="C0", linewidth=2, label="median")
    for key, name in (("warmup_steps", "W"), ("burnin_steps", "B")):
        if key in meta:
            ax.axvline(float(meta[key]), color="k", linestyle=":", linewidth=1)
            ax.annotate(name, (float(meta[key]), 1), xycoords=("data", "axes fraction"),
                        ha="left", va="top")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max(lambda, floor)")
    ax.set_title(title or f"lambda traces, {values.shape[1]} fixed scalars "
                          f"({lines} drawn; preset {meta.get('preset', '?')})")
    ax.legend(fontsize="small", loc="lower left")
    return _save(fig, path)


def plot_seed_agreement(table: pd.DataFrame, path: PathLike, title: str = "") -> Path:
    """One heatmap per measure of :func:`bayestune.diagnostics.seed_agreement`'s table:
    Spearman of the posterior-mean lambdas, Jaccard of the masks at each budget."""
    panels = list(table.groupby(["measure", "budget"], dropna=False, sort=False))
    if not panels:
        return _empty_figure(path, "fewer than two seeds: nothing to compare")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1, 3.6), squeeze=False)
    for ax, ((measure, budget), rows) in zip(axes[0], panels, strict=True):
        seeds = sorted(set(rows.seed_a) | set(rows.seed_b))
        matrix = pd.DataFrame(np.eye(len(seeds)), index=seeds, columns=seeds)
        for row in rows.itertuples():
            matrix.loc[row.seed_a, row.seed_b] = matrix.loc[row.seed_b, row.seed_a] = row.value
        sns.heatmap(matrix, annot=True, fmt=".3f", vmin=0, vmax=1, cmap="viridis", square=True,
                    ax=ax, cbar=False)
        label = "Spearman of lambda" if measure == "spearman" else f"Jaccard at {budget:g}"
        ax.set_title(label)
        ax.set_xlabel("seed")
        ax.set_ylabel("seed")
    fig.suptitle(title or "agreement across seeds")
    return _save(fig, path)


# --- validation curves, paired differences ---------------------------------------------------
def plot_mask_composition(table: pd.DataFrame, path: PathLike, budget: float) -> Path:
    """Share of the mask in each module group, per chain (``bayestune compare-chains``'s
    composition table), with each group's share of all scalars beside it."""
    data = table[(table.by == "module") & (table.budget == budget)]
    sizes = data.drop_duplicates("group").set_index("group").share_of_scalars
    shown = pd.concat([data[["chain", "group", "share_of_mask"]],
                       pd.DataFrame({"chain": "share of all scalars", "group": sizes.index,
                                     "share_of_mask": sizes.values})])
    order = sizes.sort_values(ascending=False).index.tolist()
    fig, ax = plt.subplots(figsize=(11, 4.2))
    sns.barplot(data=shown, x="group", y="share_of_mask", hue="chain", order=order, ax=ax)
    ax.set_ylabel(f"share of the {budget:g} mask")
    ax.tick_params(axis="x", rotation=40)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), title=None)
    return _save(fig, path)


def plot_stage1_validation(curves: Mapping[str, pd.DataFrame], path: PathLike) -> Path:
    """Each chain's length-rule validation score along its run."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label, curve in curves.items():
        if len(curve):
            ax.plot(curve.step, curve.val_score, marker=".", label=label)
    ax.set_xlabel("stage-1 step")
    ax.set_ylabel("validation score")
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def collect_histories(paths: Iterable[PathLike]) -> pd.DataFrame:
    """One row per evaluation of every run that recorded its validation curve: method, budget
    (label), task, seed, step, train_loss, val_score (x100), still_improving (of the run).
    Runs from before curves were recorded add nothing."""
    return _histories([files.read_json(path) for path in paths])


def _histories(records: Iterable[Mapping]) -> pd.DataFrame:
    rows = []
    for record in records:
        method = str(record.get("method", ""))
        run = {"method": method, "budget": budget_label(record.get("budget"), method),
               "task": str(record.get("task", "")), "seed": int(record.get("seed", 0)),
               "still_improving": convergence.still_improving(record)}
        for entry in record.get("history") or []:
            val, loss = entry.get("val_score"), entry.get("train_loss")
            rows.append({**run, "step": int(entry["step"]),
                         "train_loss": math.nan if loss is None else float(loss),
                         "val_score": math.nan if val is None else 100.0 * float(val)})
    columns = ["method", "budget", "task", "seed", "still_improving", "step", "train_loss",
               "val_score"]
    return pd.DataFrame(rows, columns=columns)


def _run_label(method: str, budget: str) -> str:
    return method if budget == FIXED_BUDGET else f"{method} {budget}"


def _empty_figure(path: PathLike, message: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return _save(fig, path)


def plot_val_curves(histories: pd.DataFrame, path: PathLike, title: str = "") -> Path:
    """Validation score and training loss against step, one colour per (method, budget):
    the mean over seeds with a band of one std (a seed that stopped early leaves the mean
    from there on). A label with a dagger has a run that stopped at max_steps while still
    improving."""
    if histories.empty:
        return _empty_figure(path, "no run recorded its validation curve: rerun fine-tuning "
                                   "(metrics.json files from before curves were recorded)")
    data = histories.copy()
    improving = data.groupby(["method", "budget"])["still_improving"].any()
    data["run"] = [_run_label(m, b) + (f" {DAGGER}" if improving[(m, b)] else "")
                   for m, b in zip(data["method"], data["budget"], strict=True)]
    order = _row_order(data.drop_duplicates("run"))["run"]
    seeds = data["seed"].nunique()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, column, label in ((axes[0], "val_score", "validation score (x100)"),
                              (axes[1], "train_loss", "training loss (mean since last eval)")):
        sns.lineplot(data=data, x="step", y=column, hue="run", hue_order=list(order),
                     errorbar="sd" if seeds > 1 else None, marker="o", markersize=4, ax=ax)
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    losses = data["train_loss"].dropna()
    if len(losses) and losses.gt(0).all() and losses.max() > 10 * losses.min():
        axes[1].set_yscale("log")
    axes[0].get_legend().remove()
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.02, 1), title="method")
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle((f"{title}: " if title else "") + f"validation curves ({spread}; "
                 f"{DAGGER}: a run stopped at max_steps still improving)")
    return _save(fig, path)


def plot_paired_differences(differences: pd.DataFrame, path: PathLike) -> Path:
    """Forest plot: one row per comparison, the mean paired difference and its 95% interval,
    a line at zero; the number of pairs at the right."""
    if differences.empty:
        return _empty_figure(path, "no paired comparison: the reference method shares no "
                                   "(task, seed) with another method")
    reference = str(differences["reference"].iloc[0])
    labels = [_run_label(r.method, r.budget) + ("" if r.budget == r.reference_budget
                                                else f" (vs {reference} {r.reference_budget})")
              for r in differences.itertuples()]
    y = np.arange(len(differences))[::-1]
    mean = differences["mean_difference"].to_numpy(float)
    low, high = differences["ci_low"].to_numpy(float), differences["ci_high"].to_numpy(float)
    has_ci = np.isfinite(low) & np.isfinite(high)
    fig, ax = plt.subplots(figsize=(7, 0.42 * len(differences) + 1.5))
    ax.axvline(0, color="grey", linewidth=1)
    ax.errorbar(mean[has_ci], y[has_ci], xerr=[mean[has_ci] - low[has_ci],
                                               high[has_ci] - mean[has_ci]],
                fmt="o", color="C0", capsize=3)
    ax.plot(mean[~has_ci], y[~has_ci], "o", mfc="none", color="C0")
    ax.set_yticks(y, labels)
    for row_y, pairs in zip(y, differences["pairs"], strict=True):
        ax.annotate(f"n={pairs}", (1.01, row_y), xycoords=("axes fraction", "data"),
                    va="center", fontsize="small")
    ax.set_ylim(-0.7, len(differences) - 0.3)
    ax.set_xlabel(f"{reference} minus method, test score (x100), mean over (task, seed) pairs")
    ax.set_title(f"{reference} against each method (> 0 favours {reference})\n"
                 f"bars: 95% bootstrap interval; open circle: under {paired.MIN_PAIRS} pairs, "
                 "no interval; n: pairs", fontsize="medium")
    return _save(fig, path)


# --- the figures command ------------------------------------------------------------------------
def _describe(path: Path, meta: Mapping[str, object], kind: str) -> dict[str, str]:
    """Method/task/seed/budget of a mask or scale file: its metadata, else its path
    (.../masks/<method>/<task>/seed<S>/p<budget>.safetensors, .../scales/<task>/seed<S>...)."""
    parts = path.parts
    if kind == "mask":
        fallback = {"method": parts[-4] if len(parts) >= 4 else path.stem,
                    "task": parts[-3] if len(parts) >= 3 else "", "budget": path.stem[1:]}
    else:
        fallback = {"method": "bayestune", "task": path.parent.name, "budget": ""}
    info = {k: str(meta.get(k) or v) for k, v in fallback.items()}
    info["seed"] = str(meta.get("seed", path.parent.name.removeprefix("seed")
                                if kind == "mask" else path.stem.removeprefix("seed")))
    return info


def _by_task(entries: list[tuple[dict[str, str], dict]]) -> dict[str, dict[str, dict]]:
    grouped: dict[str, dict[str, dict]] = {}
    for info, tensors in entries:
        grouped.setdefault(info["task"], {})[info["label"]] = tensors
    return grouped


def write_figures(out_dir: PathLike, scales: Sequence[PathLike] = (),
                  masks: Sequence[PathLike] = (), scores_csv: PathLike | None = None,
                  metrics: Sequence[PathLike] = (),
                  paired_csv: PathLike | None = None) -> list[Path]:
    """Every figure the given files allow, into ``out_dir``.

    scales -> ``lambda_histogram.png``; masks -> ``mask_locations.png`` and
    ``mask_overlap.png`` (per task; the task is appended to the name when the masks cover
    several); scores_csv (``<benchmark>_scores.csv``) -> ``score_vs_budget.png``; metrics
    (metrics.json files) -> ``val_curves.png`` (per task, named like the mask figures);
    paired_csv (``<benchmark>_paired.csv``) -> ``paired_differences.png``.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []
    entries = []
    for path in map(Path, masks):
        tensors, meta = files.load_mask(path)
        info = _describe(path, meta, "mask")
        info["label"] = info["method"]
        entries.append((info, tensors))
    if scales:
        loaded = {}
        for path in map(Path, scales):
            tensors, meta = files.load_scales(path)
            info = _describe(path, meta, "scales")
            loaded[f"{info['task']} seed {info['seed']}"] = tensors
        # The cut drawn is the budget of the masks shown beside it (0.5% without masks).
        try:
            budget = float(entries[0][0]["budget"]) if entries else 0.005
        except ValueError:
            budget = 0.005
        written.append(plot_lambda_histogram(loaded, out_dir / "lambda_histogram.png", budget))
    if entries:
        grouped = _by_task(entries)
        for task, task_masks in grouped.items():
            suffix = f"_{task}" if len(grouped) > 1 else ""
            written.append(plot_mask_locations(task_masks, out_dir / f"mask_locations{suffix}.png"))
            budget = entries[0][0]["budget"]
            written.append(plot_mask_overlap(task_masks, out_dir / f"mask_overlap{suffix}.png",
                                             title=f"{task}: mask overlap at budget {budget}"))
    if scores_csv is not None:
        scores = pd.read_csv(scores_csv, dtype={"budget": str})
        written.append(plot_score_vs_budget(scores, out_dir / "score_vs_budget.png"))
    if metrics:
        written += _write_val_curves(metrics, out_dir)
    if paired_csv is not None:
        written.append(plot_paired_differences(read_paired(paired_csv),
                                               out_dir / "paired_differences.png"))
    if not written:
        raise ConfigError("nothing to plot: give --scales, --masks, --scores-csv, --metrics or "
                          "--paired-csv")
    return written


def _write_val_curves(metrics: Sequence[PathLike], out_dir: Path) -> list[Path]:
    records = [files.read_json(path) for path in metrics]
    histories = _histories(records)
    tasks = sorted({str(record.get("task", "")) for record in records})
    written = []
    for task in tasks:
        suffix = f"_{task}" if len(tasks) > 1 else ""
        written.append(plot_val_curves(histories[histories["task"] == task],
                                       out_dir / f"val_curves{suffix}.png", title=task))
    return written
