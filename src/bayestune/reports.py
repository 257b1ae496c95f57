"""Tables and figures of a benchmark run, from the files the pipeline writes.

* Tables: one long row per fine-tuning run (``<benchmark>_scores.csv``), then one row per
  (method, budget) with the mean and std over seeds of every task, x100 (``_table.csv`` and
  ``_table.md``). For RoBERTa-base the published GLUE rows are added, marked "(published)".
  A cell with a run that stopped at max_steps while still improving gets a dagger (the rule is
  in :mod:`bayestune.convergence`). A reference method (BayesTune by default) minus every
  other, paired over (task, seed) with bootstrap intervals (:mod:`bayestune.paired`), is a
  second Markdown table and ``_paired.csv``.
* Figures (PNG, matplotlib's Agg backend): where a mask's scalars sit (per layer and per module
  type), score against trainable fraction, the posterior-mean lambda on a log scale, the
  Jaccard overlap of the methods' masks, the validation curves of the runs and a forest plot
  of the paired differences.

Every file goes through :func:`bayestune.files.atomic_output`, so a killed report never
leaves half a table behind.
"""

from __future__ import annotations

import math
import os
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
from bayestune.methods.registry import BUDGETED, REGISTRY  # noqa: E402
from bayestune.models.base import is_head  # noqa: E402
from bayestune.sweep import complete_seeds  # noqa: E402

PathLike = str | os.PathLike[str]

GLUE_TASKS = ("cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc")
METHOD_ORDER = tuple(REGISTRY)
FIXED_BUDGET = "-"  # budget label of methods whose trainable set is not a budget choice
FIXED_METHODS = frozenset(name for name, spec in REGISTRY.items() if spec.kind != BUDGETED)

# Published scores at budget 0.5% for RoBERTa-base, mean of 10 seeds, x100 (the SAM paper:
# Fu et al., "On the Effectiveness of Parameter-Efficient Fine-Tuning", AAAI 2023, Table 2;
# as BayesTune reprints them). Columns: cola, stsb, mrpc, rte, cb, copa, wsc.
PUBLISHED_GLUE: dict[str, tuple[float, ...]] = {  # the seven tasks, then the published AVG
    "full fine-tuning": (58.36, 89.80, 89.55, 76.03, 88.93, 67.70, 53.10, 74.78),
    "random mask": (58.35, 89.81, 88.73, 72.71, 90.54, 68.80, 52.88, 74.55),
    "MixOut": (58.66, 90.15, 88.69, 77.55, 86.51, 71.30, 52.98, 75.12),
    "BitFit": (56.67, 90.12, 87.35, 72.74, 86.96, 71.20, 55.10, 74.31),
    "magnitude pruning": (56.57, 90.30, 88.09, 73.53, 81.25, 71.50, 55.67, 73.85),
    "Adapter": (62.11, 90.05, 89.29, 76.93, 87.32, 69.50, 57.02, 76.03),
    "LoRA": (60.88, 87.19, 89.53, 76.97, 84.64, 69.70, 56.84, 75.11),
    "Diff Pruning": (58.53, 89.59, 78.79, 69.93, 86.25, 72.10, 53.37, 72.65),
    "Child Pruning": (60.00, 89.97, 87.19, 75.76, 86.61, 69.40, 55.59, 74.93),
    "SAM": (60.89, 90.59, 88.84, 76.79, 88.93, 74.30, 59.52, 77.12),
}
PUBLISHED_BUDGET = "0.005"
PUBLISHED_MODEL = "roberta-base"
# Published rows of methods this project does not run: named in a note, never in the table.
NOT_RUN = tuple(label for label in PUBLISHED_GLUE
                if label not in {spec.published for spec in REGISTRY.values()})

_RUN_KEYS = ("method", "budget", "task", "seed", "metric", "test_score", "trainable_fraction")


# --- tables -------------------------------------------------------------------------------------
def budget_label(budget: object, method: str = "") -> str:
    """A metrics.json budget as a table label: 0.005 -> "0.005"; "-" for methods whose
    trainable set the budget does not choose (full, LoRA, BitFit: see trainable_fraction)."""
    if method in FIXED_METHODS or isinstance(budget, bool) or budget is None:
        return FIXED_BUDGET
    try:
        return format(float(budget), "g")
    except (TypeError, ValueError):
        return FIXED_BUDGET


def collect_scores(paths: Iterable[PathLike]) -> pd.DataFrame:
    """One row per fine-tuning run (metrics.json): scores x100, the budget as a label."""
    rows = []
    for path in paths:
        record = files.read_json(path)
        missing = [k for k in _RUN_KEYS if k not in record]
        if missing:
            raise files.FileFormatError(
                f"{path}: not a fine-tuning metrics.json (missing {', '.join(missing)}); "
                "rerun `bayestune finetune` for it")
        rows.append({
            "method": str(record["method"]),
            "budget": budget_label(record["budget"], str(record["method"])),
            "task": str(record["task"]),
            "seed": int(record["seed"]),
            "metric": str(record["metric"]),
            "score": 100.0 * float(record["test_score"]),
            "val_score": 100.0 * float(record.get("val_score", math.nan)),
            "trainable_fraction": float(record["trainable_fraction"]),
            "model": str(record.get("model", "")),
            "stop_reason": str(record.get("stop_reason") or ""),  # "" in files older than it
            "still_improving": convergence.still_improving(record),
            # the published row with the run's definition; none in files older than the field
            "published_as": str(record.get("published_as") or ""),
            # why not, when the method has a published row ("" in files older than the field)
            "published_differs": "; ".join(record.get("published_differs") or []),
            # the fair protocol's choice: the stage-2 rate (and bayestune's stage-1 preset) that
            # won on validation among the run's candidates
            "chosen_lr": float((record.get("finetune") or {}).get("lr", math.nan)),
            "chosen_preset": str((record.get("chosen") or {}).get("preset") or ""),
            "candidates": len((record.get("selection") or {}).get("candidates") or [None]),
        })
    if not rows:
        raise ConfigError("no metrics.json files given; run the fine-tuning stage first")
    scores = pd.DataFrame(rows)
    dupes = scores.duplicated(["method", "budget", "task", "seed"])
    if dupes.any():
        first = scores[dupes].iloc[0]
        raise ConfigError(f"two runs of {first.method} budget {first.budget} on {first.task} seed "
                          f"{first.seed}: pass each metrics.json once")
    return scores


def write_selection(paths: Iterable[PathLike], out_dir: PathLike, benchmark: str) -> Path:
    """``<benchmark>_selection.csv``: every candidate of every run with its validation score
    (x100) and whether validation chose it."""
    from bayestune.selection import selection_rows

    rows = selection_rows(files.read_json(path) for path in paths)
    columns = ["method", "task", "seed", "budget", "candidate", "settings", "lr", "preset",
               "val_score", "best_step", "steps", "stop_reason", "chosen"]
    path = Path(out_dir) / f"{benchmark}_selection.csv"
    with files.atomic_output(path) as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    return path


def _task_order(tasks: Iterable[str], benchmark: str) -> list[str]:
    if benchmark == "vtab":
        from bayestune.tasks.vtab import TASKS as known
    else:
        known = GLUE_TASKS
    present = set(tasks)
    return [t for t in known if t in present] + sorted(present - set(known))


def _row_order(table: pd.DataFrame) -> pd.DataFrame:
    def key(column: pd.Series) -> pd.Series:
        if column.name == "budget":
            return column.map(lambda b: -1.0 if b == FIXED_BUDGET else float(b))
        rank = {m: i for i, m in enumerate(METHOD_ORDER)}
        return column.map(lambda m: rank.get(m, len(rank)))

    return table.sort_values(["budget", "method"], key=key, kind="stable").reset_index(drop=True)


def make_table(scores: pd.DataFrame, benchmark: str) -> pd.DataFrame:
    """One row per (method, budget): mean and std over seeds per task, and their average.

    GLUE's ``avg`` is the plain mean of the task means; VTAB adds the three group means and
    ``avg`` is the mean of the group means (NaN unless every group has a task), as published.
    """
    if benchmark not in ("glue", "vtab"):
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose glue or vtab")
    tasks = _task_order(scores["task"], benchmark)
    keys = ["method", "budget"]
    stats = scores.groupby(keys + ["task"])["score"].agg(["mean", "std", "count"])
    means = stats["mean"].unstack("task").reindex(columns=tasks)
    stds = stats["std"].unstack("task").reindex(columns=tasks).add_suffix("_std")
    table = pd.DataFrame(index=means.index)
    table["trainable_fraction"] = scores.groupby(keys)["trainable_fraction"].mean()
    table["seeds"] = stats["count"].groupby(level=keys).min()
    table = table.join(means).join(stds).join(_improving_counts(scores, keys, tasks))
    if benchmark == "vtab":
        from bayestune.tasks.vtab import GROUPS, group_means

        groups = pd.DataFrame([group_means(row.dropna().to_dict()) for _, row in means.iterrows()],
                              index=means.index)
        table[list(GROUPS)] = groups[list(GROUPS)]
        table["avg"] = groups["Mean"]
    else:
        table["avg"] = means.mean(axis=1, skipna=False)
    return _row_order(table.reset_index())


def is_published_model(model: str) -> bool:
    return model.rstrip("/").split("/")[-1] == PUBLISHED_MODEL


def published_rows(model: str, tasks: Sequence[str] = GLUE_TASKS,
                   labels: Sequence[str] | None = None) -> pd.DataFrame:
    """The published GLUE rows for RoBERTa-base (empty for any other model): ``labels``, or
    every row whose method a registered method reproduces.

    ``avg`` is the published AVG when ``tasks`` are all seven, else the mean over ``tasks``,
    so that it compares with the average of a run that covers only those tasks.
    """
    if not is_published_model(model) or not set(tasks) & set(GLUE_TASKS):
        return pd.DataFrame()  # none of the seven (e.g. only declared tasks): nothing to compare
    wanted = [label for label in PUBLISHED_GLUE if label not in NOT_RUN] if labels is None \
        else list(labels)
    rows = []
    for label in wanted:
        *values, published_avg = PUBLISHED_GLUE[label]
        by_task = dict(zip(GLUE_TASKS, values, strict=True))
        row = {"method": f"{label} (published)", "budget": PUBLISHED_BUDGET}
        row.update({t: by_task[t] for t in tasks if t in by_task})
        shown = [by_task[t] for t in tasks if t in by_task]
        full = set(GLUE_TASKS) <= set(tasks)
        row["avg"] = published_avg if full else (sum(shown) / len(shown) if shown else math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def with_published_rows(table: pd.DataFrame, scores: pd.DataFrame, model: str,
                        tasks: Sequence[str]) -> pd.DataFrame:
    """``table`` with each published row right below our row of the same definition.

    A row qualifies when every run behind it recorded the same ``published_as`` label (the
    method's registry definition, with its published settings) and it is at the published
    budget (or has no budget: full, BitFit, LoRA). lt-sft, fisher, bayestune and runs with
    changed settings record none, so no published row stands beside them.
    """
    if not is_published_model(model) or "published_as" not in scores:
        return table
    labels = scores.groupby(["method", "budget"])["published_as"].agg(
        lambda runs: runs.iloc[0] if runs.nunique() == 1 else "")
    parts = []
    for i, (method, budget) in enumerate(zip(table["method"], table["budget"], strict=True)):
        parts.append(table.iloc[[i]])
        label = labels.get((method, budget), "")
        if label and budget in (PUBLISHED_BUDGET, FIXED_BUDGET):
            parts.append(published_rows(model, tasks, [label]).assign(budget=budget))
    return pd.concat(parts, ignore_index=True) if parts else table


def published_note(model: str, scores: pd.DataFrame | None = None) -> str:
    """The note under the Markdown table saying where the published rows come from and, for
    each of our rows whose method has a published row that is left out, why."""
    if not is_published_model(model):
        return ""
    note = ("\n(published): RoBERTa-base at a 0.5% budget, mean of 10 seeds (Fu et al., AAAI "
            "2023, Table 2), shown only beside our method of the same definition, architecture "
            "and stage-2 settings (the SAM repository's scripts/train.sh). Published rows of "
            f"methods not run here: {', '.join(NOT_RUN)}.\n")
    return note + "".join(f"- no published row beside {line}\n"
                          for line in _left_out(scores))


def _left_out(scores: pd.DataFrame | None) -> list[str]:
    """"method budget: why" for each (method, budget) at the published budget whose method
    has a published row that its runs may not stand beside."""
    if scores is None or "published_as" not in scores:
        return []
    lines = []
    for (method, budget), runs in scores.groupby(["method", "budget"], sort=False):
        spec = REGISTRY.get(method)
        if spec is None or spec.published is None or budget not in (PUBLISHED_BUDGET,
                                                                      FIXED_BUDGET):
            continue
        if runs["published_as"].nunique() == 1 and runs["published_as"].iloc[0]:
            continue
        reasons = sorted({r for text in runs.get("published_differs", pd.Series(dtype=str))
                          for r in str(text).split("; ") if r and r != "nan"})
        why = "; ".join(reasons) if reasons else (
            "its runs record no match (written before the check, or runs that disagree)")
        lines.append(f"{method} {budget} ({spec.published}): {why}")
    return lines


def _markdown(table: pd.DataFrame, tasks: Sequence[str], extra: Sequence[str]) -> str:
    def cell(mean: float, std: float, improving: float = 0) -> str:
        if pd.isna(mean):
            return ""
        text = f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"
        return text + (f" {DAGGER}" if improving > 0 else "")

    rows = []
    for _, row in table.iterrows():
        fraction = row.get("trainable_fraction", math.nan)
        out = {"method": row["method"], "budget": row["budget"],
               "trainable %": "" if pd.isna(fraction) else f"{100 * fraction:.3g}"}
        for task in tasks:
            out[task] = cell(row.get(task, math.nan), row.get(f"{task}_std", math.nan),
                             _count(row.get(f"{task}{IMPROVING_SUFFIX}")))
        for name in extra:
            out[name] = "" if pd.isna(row.get(name)) else f"{row[name]:.2f}"
        rows.append(out)
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True) + "\n"


def write_tables(scores: pd.DataFrame, out_dir: PathLike, benchmark: str,
                 model: str = "", reference: str = "bayestune",
                 main_budget: str = paired.DEFAULT_MAIN_BUDGET) -> list[Path]:
    """Write ``<benchmark>_scores.csv``, ``_table.csv``, ``_table.md`` and ``_paired.csv`` into
    ``out_dir``: the paired differences compare ``reference`` with every other method (methods
    without a budget at ``main_budget``, a budget label such as ``"0.005"``)."""
    out_dir = Path(out_dir)
    table = make_table(scores, benchmark)
    differences = paired_table(scores, reference, main_budget)
    tasks = _task_order(scores["task"], benchmark)
    if benchmark == "glue":
        models = set(scores["model"]) if "model" in scores else set()
        model = model or (models.pop() if len(models) == 1 else "")
        table = with_published_rows(table, scores, model, tasks)
    extra = (["Natural", "Specialized", "Structured"] if benchmark == "vtab" else []) + ["avg"]
    paths = [out_dir / f"{benchmark}_{name}" for name in ("scores.csv", "table.csv", "table.md")]
    with files.atomic_output(paths[0]) as tmp:
        scores.to_csv(tmp, index=False)
    with files.atomic_output(paths[1]) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    with files.atomic_output(paths[2]) as tmp:
        note = published_note(model, scores) if benchmark == "glue" else ""
        tmp.write_text(_markdown(table, tasks, extra) + _improving_note(scores) + note
                       + _paired_markdown(differences, reference, main_budget))
    paths.append(write_table_csv(differences, out_dir / f"{benchmark}_paired.csv"))
    return paths


# --- convergence flags and paired differences ---------------------------------------------------
DAGGER = "†"
IMPROVING_SUFFIX = "_improving"  # table column: runs of the cell still improving at max_steps


def _count(value: object) -> int:
    return 0 if value is None or pd.isna(value) else int(value)


def _improving_counts(scores: pd.DataFrame, keys: list[str], tasks: Sequence[str]) -> pd.DataFrame:
    """Per (method, budget) and task: how many seeds stopped at max_steps still improving."""
    flags = (scores["still_improving"] if "still_improving" in scores
             else pd.Series(False, index=scores.index))
    counts = flags.astype(int).groupby([scores[k] for k in keys + ["task"]]).sum()
    return (counts.unstack("task").reindex(columns=list(tasks)).fillna(0).astype(int)
            .add_suffix(IMPROVING_SUFFIX))


def _improving_note(scores: pd.DataFrame) -> str:
    """The dagger's meaning under the table, with how many runs it marks; nothing when no run
    recorded its stop reason (metrics.json files from before it was recorded)."""
    if "stop_reason" not in scores or not scores["stop_reason"].astype(bool).any():
        return ""
    checked = int(scores["stop_reason"].astype(bool).sum())
    flagged = int(scores["still_improving"].sum())
    note = (f"\n{DAGGER} at least one seed of this cell {convergence.STILL_IMPROVING_RULE}. "
            f"Runs flagged: {flagged} of the {checked} with a recorded validation curve.")
    if checked < len(scores):
        note += f" {len(scores) - checked} runs recorded none and are not checked."
    return note + "\n"


def paired_table(scores: pd.DataFrame, reference: str = "bayestune",
                 main_budget: str = paired.DEFAULT_MAIN_BUDGET) -> pd.DataFrame:
    """:func:`bayestune.paired.paired_differences` in the tables' row order."""
    differences = paired.paired_differences(scores, reference, main_budget)
    return _row_order(differences) if len(differences) else differences


def write_table_csv(table: pd.DataFrame, path: PathLike) -> Path:
    """A small results table as CSV (six significant digits), written atomically."""
    path = Path(path)
    with files.atomic_output(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return path



def read_paired(path: PathLike) -> pd.DataFrame:
    """A ``<benchmark>_paired.csv`` as :func:`write_table_csv` wrote it (budgets as labels)."""
    table = pd.read_csv(path, dtype={"budget": str, "reference_budget": str})
    missing = [c for c in paired.COLUMNS if c not in table.columns]
    if missing:
        raise files.FileFormatError(f"{path}: not a paired-differences table (missing "
                                    f"{', '.join(missing)}); rerun `bayestune report`")
    return table


def _interval_text(row: pd.Series) -> str:
    if row["ci_method"] == paired.CI_TOO_FEW:
        return f"- ({paired.CI_TOO_FEW})"
    text = f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
    return text if row["ci_method"] == paired.CI_BCA else f"{text} {row['ci_method']}"


def _paired_markdown(differences: pd.DataFrame, reference: str, main_budget: str) -> str:
    heading = f"\n## {reference} minus method (test score x100, paired over task and seed)\n\n"
    if differences.empty:
        return heading + f"No comparison: {reference} and another method share no (task, seed).\n"
    rows = [{"method": r["method"], "budget": r["budget"], f"{reference} budget":
             r["reference_budget"], "pairs": str(r["pairs"]),
             "mean difference": f"{r['mean_difference']:+.2f}", "95% CI": _interval_text(r)}
            for _, r in differences.iterrows()]
    note = (f"\nMean over the (task, seed) pairs both ran of {reference}'s test score minus the "
            f"method's; methods without a budget ({paired.NO_BUDGET}) are compared with "
            f"{reference} at the main budget {main_budget}. 95% interval: bootstrap of the "
            f"pairs (scipy.stats.bootstrap, BCa, {paired.N_RESAMPLES} resamples, seed "
            f"{paired.BOOTSTRAP_SEED}); the percentile interval where BCa is undefined, none "
            f"with fewer than {paired.MIN_PAIRS} pairs, zero width when every difference is "
            f"the same. An interval above 0 favours {reference}.\n")
    table = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
    return heading + table + "\n" + note


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


# --- provenance ---------------------------------------------------------------------------------
PROVENANCE_FIELDS = ("command", "bayestune_version", "git_commit", "git_dirty", "code_sha256",
                     "lock_sha256", "python", "torch", "transformers", "device", "config_sha256")
# What must agree across a table: the commit and the software. (The code hash differs between
# commands by design and is compared per stage; config and device may differ on purpose.)
_SOURCE_AND_SOFTWARE = ("bayestune_version", "git_commit", "git_dirty", "lock_sha256", "python",
                        "torch", "transformers")
_RUN = ["method", "budget", "task", "seed"]


def collect_provenance(paths: Iterable[PathLike]) -> pd.DataFrame:
    """One row per (fine-tuning run, stage): the run's own provenance record (stage
    ``finetune``) and those of the mask and scale file it was made from, as metrics.json
    keeps them. A run that recorded none gives one row with the fields empty."""
    rows = []
    for path in paths:
        record = files.read_json(path)
        run = {"method": str(record.get("method")),
               "budget": budget_label(record.get("budget"), str(record.get("method"))),
               "task": str(record.get("task")), "seed": record.get("seed")}
        chain = {"finetune": record.get(files.PROVENANCE_KEY), **(record.get("upstream") or {})}
        recorded = {stage: p for stage, p in chain.items() if p}
        for stage, prov in (recorded or {"finetune": {}}).items():
            rows.append({**run, "stage": stage, **{f: prov.get(f) for f in PROVENANCE_FIELDS}})
    return pd.DataFrame(rows, columns=_RUN + ["stage", *PROVENANCE_FIELDS])


def provenance_problems(prov: pd.DataFrame) -> list[str]:
    """Why the runs of one table may not be comparable: mixed commits or software, different
    code for one stage, or runs that recorded nothing. Empty when they agree."""
    problems = []
    missing = prov[prov["git_commit"].isna() & prov["python"].isna()]
    if len(missing):
        problems.append(f"{len(missing.drop_duplicates(_RUN))} run(s) record no provenance "
                        "(written before it was recorded)")
    known = prov.drop(missing.index).fillna("-").astype(str)
    groups = known.drop_duplicates(list(_SOURCE_AND_SOFTWARE))
    if len(groups) > 1:
        commits = sorted({c[:10] for c in groups["git_commit"]})
        problems.append(f"{len(groups)} different commits or environments (commits "
                        f"{', '.join(commits)}; see <benchmark>_provenance.csv)")
    for stage, rows in known.groupby("stage"):
        if rows["code_sha256"].nunique() > 1:
            problems.append(f"{rows['code_sha256'].nunique()} different versions of the "
                            f"{stage} code")
    return problems


def _provenance_markdown(prov: pd.DataFrame, problems: Sequence[str]) -> str:
    known = prov.fillna("-").astype(str)
    rows = []
    for key, group in known.groupby(list(_SOURCE_AND_SOFTWARE), sort=False):
        values = dict(zip(_SOURCE_AND_SOFTWARE, key, strict=True))
        rows.append({"commit": values["git_commit"][:10],
                     "uncommitted changes": {"True": "yes", "False": "no"}.get(
                         values["git_dirty"], "-"),
                     "lock": values["lock_sha256"][:10], "python": values["python"],
                     "torch": values["torch"], "transformers": values["transformers"],
                     "devices": ", ".join(sorted(set(group["device"]))),
                     "stages": ", ".join(sorted(set(group["stage"]))),
                     "runs": str(len(group.drop_duplicates(_RUN)))})
    text = "\n## Provenance\n\n" + pd.DataFrame(rows).to_markdown(
        index=False, disable_numparse=True) + "\n"
    for problem in problems:
        text += (f"\n**Warning:** this table mixes runs: {problem}. Rerun the workflow to "
                 "rebuild the stale ones.\n")
    return text


def write_provenance(metrics: Iterable[PathLike], out_dir: PathLike, benchmark: str) -> Path:
    """Write ``<benchmark>_provenance.csv`` (every run and stage) into ``out_dir``; append a
    provenance table, and a warning when the runs mix code or software, to
    ``<benchmark>_table.md`` (written first by :func:`write_tables`)."""
    import logging

    out_dir = Path(out_dir)
    prov = collect_provenance(metrics)
    problems = provenance_problems(prov)
    for problem in problems:
        logging.getLogger("bayestune").warning("%s_table mixes runs: %s", benchmark, problem)
    path = out_dir / f"{benchmark}_provenance.csv"
    with files.atomic_output(path) as tmp:
        prov.to_csv(tmp, index=False)
    table = out_dir / f"{benchmark}_table.md"
    text = table.read_text() if table.is_file() else ""
    with files.atomic_output(table) as tmp:
        tmp.write_text(text + _provenance_markdown(prov, problems))
    return path


def write_table_html(out_dir: PathLike, benchmark: str) -> Path:
    """``<benchmark>_table.html``: the Markdown table (scores, provenance, warnings) as HTML,
    the form in which ``snakemake --report`` shows a table on its page (CSV files it only
    offers as downloads)."""
    from markdown_it import MarkdownIt

    out_dir = Path(out_dir)
    text = (out_dir / f"{benchmark}_table.md").read_text()
    body = MarkdownIt("commonmark").enable("table").render(text)
    style = ("body{font-family:sans-serif;font-size:14px}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:2px 8px;text-align:right}")
    path = out_dir / f"{benchmark}_table.html"
    with files.atomic_output(path) as tmp:
        tmp.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{style}"
                       f"</style></head><body>{body}</body></html>\n")
    return path
