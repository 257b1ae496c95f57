"""The provenance of a table's runs: every run's record and those of the files it was made
from (``<benchmark>_provenance.csv``), and a warning in the Markdown table when the runs mix
commits, software or code."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from bayestune import files
from bayestune.reports.tables import PathLike, budget_label

PROVENANCE_FIELDS = ("command", "bayestune_version", "git_commit", "git_dirty", "code_sha256",
                     "lock_sha256", "python", "torch", "transformers", "device", "config_sha256")
# What must agree across a table: the commit and the software. (The code hash differs between
# commands by design and is compared per stage; config and device may differ on purpose.)
_SOURCE_AND_SOFTWARE = ("bayestune_version", "git_commit", "git_dirty", "lock_sha256", "python",
                        "torch", "transformers")
_RUN = ["method", "budget", "task", "seed"]
# A run is its metrics.json: with --label-presets two chains' runs share method, budget, task
# and seed, so counting by those would merge them.
_RUN_FILE = "metrics"


def collect_provenance(paths: Iterable[PathLike]) -> pd.DataFrame:
    """One row per (fine-tuning run, stage): the run's own provenance record (stage
    ``finetune``) and those of the mask and scale file it was made from, as metrics.json
    keeps them, and the metrics.json it came from. A run that recorded none gives one row with
    the fields empty."""
    rows = []
    for path in paths:
        record = files.read_json(path)
        run = {"method": str(record.get("method")),
               "budget": budget_label(record.get("budget"), str(record.get("method"))),
               "task": str(record.get("task")), "seed": record.get("seed"),
               _RUN_FILE: str(path)}
        chain = {"finetune": record.get(files.PROVENANCE_KEY), **(record.get("upstream") or {})}
        recorded = {stage: p for stage, p in chain.items() if p}
        for stage, prov in (recorded or {"finetune": {}}).items():
            rows.append({**run, "stage": stage, **{f: prov.get(f) for f in PROVENANCE_FIELDS}})
    return pd.DataFrame(rows, columns=_RUN + ["stage", *PROVENANCE_FIELDS, _RUN_FILE])


def provenance_problems(prov: pd.DataFrame) -> list[str]:
    """Why the runs of one table may not be comparable: mixed commits or software, different
    code for one stage, or runs that recorded nothing. Empty when they agree."""
    problems = []
    missing = prov[prov["git_commit"].isna() & prov["python"].isna()]
    if len(missing):
        problems.append(f"{missing[_RUN_FILE].nunique()} run(s) record no provenance "
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
                     "runs": str(group[_RUN_FILE].nunique())})
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
