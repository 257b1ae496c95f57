"""The score tables of a benchmark run, from the runs' metrics.json files.

One long row per fine-tuning run (``<benchmark>_scores.csv``), then one row per (method,
budget) with the mean and std over seeds of every task, x100 (``_table.csv`` and
``_table.md``). For RoBERTa-base the published GLUE rows are added, marked "(published)". A
cell with a run that stopped at max_steps while still improving gets a dagger (the rule is in
:mod:`bayestune.convergence`). A reference method (BayesTune by default) minus every other,
paired over (task, seed) with bootstrap intervals (:mod:`bayestune.paired`), is a second
Markdown table and ``_paired.csv``; every candidate of the fair protocol goes to
``_selection.csv``; the Markdown page also as HTML (``_table.html``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from bayestune import convergence, files, paired
from bayestune.errors import ConfigError
from bayestune.methods.registry import BUDGETED, REGISTRY

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


def collect_scores(paths: Iterable[PathLike], label_presets: bool = False) -> pd.DataFrame:
    """One row per fine-tuning run (metrics.json): scores x100, the budget as a label. With
    ``label_presets`` a bayestune run is named by its stage-1 preset, e.g. ``bayestune (cold)``,
    so that runs of several chains (several results folders) stand side by side."""
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
    if label_presets:
        chained = (scores["method"] == "bayestune") & (scores["chosen_preset"] != "")
        scores.loc[chained, "method"] = "bayestune (" + scores.loc[chained, "chosen_preset"] + ")"
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
        # "bayestune (cold)" sorts with bayestune
        return column.map(lambda m: rank.get(str(m).split(" (")[0], len(rank)))

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
