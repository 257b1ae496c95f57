"""What finished stage-1 chains rank by, side by side: `bayestune compare-chains`.

For every chain of a task in one or more results folders (each preset, each seed) it reads the
scale file, the chain diagnostics beside it and the chain's job log, and writes to one folder:

* ``chains.csv``: per chain, its length and whether jiant's early stopping had ended it, its
  best validation score, per phase the typical size of lambda's noise against its data/prior
  gradient, and the rank agreement of the posterior mean with |theta - theta0|, |theta0| and
  the Fisher score (Spearman, and Jaccard of the top 0.5%, against chance);
* ``agreement.csv``: per pair of chains (two seeds of a preset, two presets of a seed) the
  Spearman correlation of their posterior means and the Jaccard overlap of their masks at each
  budget, and per chain the overlap with the other methods' masks of the same seed;
* ``composition.csv`` and ``mask_composition.png``: where each chain's masks sit (word,
  position and token-type embeddings, each module type, biases, per layer, pooler, head)
  against each group's share of all scalars;
* ``stage1_validation.png``: each chain's validation score along its run (the length rule's).

Masks are cut from the scale files as the bayestune method cuts them (global top-k over every
scalar, head and pooler included), so any budget can be compared, not only the run's.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bayestune import files
from bayestune.diagnostics import PHASES, flat, jaccard, rank_agreement
from bayestune.errors import MissingFileError
from bayestune.masks import masks_from_scores
from bayestune.reports.figures import (
    parameter_location,
    plot_mask_composition,
    plot_stage1_validation,
)
from bayestune.reports.tables import write_table_csv

BUDGETS = (0.001, 0.005, 0.02)
# The sampler's log line after a validation (sampler._log_line); the only reader of job logs.
_VALIDATION = re.compile(r"stage 1 step (\d+)(?:/\d+)? \([\w-]+\): .*?, validation "
                         r"(-?[\d.]+(?:e-?\d+)?)(?: \(best\))?, (\d+) without improvement")

_SCALE_FILE = re.compile(r"seed(\d+)\.safetensors")


@dataclass(frozen=True)
class Chain:
    """One finished stage-1 run: its scale file and what the workflow wrote beside it."""

    run: Path
    preset: str
    task: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.preset} seed {self.seed}"

    @property
    def scale_path(self) -> Path:
        return self.run / "scales" / self.preset / self.task / f"seed{self.seed}.safetensors"

    @property
    def log_path(self) -> Path:
        return self.run / "logs" / "sample" / self.preset / self.task / f"seed{self.seed}.log"


def find_chains(runs: Iterable[str | Path], task: str) -> list[Chain]:
    """Every chain of ``task`` in the results folders ``runs`` (any preset, any seed)."""
    chains = []
    for run in map(Path, runs):
        for path in sorted(run.glob(f"scales/*/{task}/seed*.safetensors")):
            seed = _SCALE_FILE.fullmatch(path.name)
            if seed:  # not the traces file beside it
                chains.append(Chain(run, path.parent.parent.name, task, int(seed[1])))
    if not chains:
        raise MissingFileError(f"no scale file of task {task!r} under "
                               f"{', '.join(map(str, runs))}/scales/<preset>/{task}/; run "
                               "stage 1 first (make reproduce)")
    return chains


def validation_curve(chain: Chain) -> pd.DataFrame:
    """The length rule's validation scores of a chain, from its job log (empty without one)."""
    rows = []
    if chain.log_path.is_file():
        for line in chain.log_path.read_text(errors="replace").splitlines():
            found = _VALIDATION.search(line)
            if found:
                rows.append((int(found[1]), float(found[2]), int(found[3])))
    return pd.DataFrame(rows, columns=["step", "val_score", "since_best"])


def chain_row(chain: Chain, meta: Mapping[str, Any], curve: pd.DataFrame) -> dict[str, Any]:
    """One row of ``chains.csv``, from the chain's scale-file metadata and validation curve."""
    summary = files.load_diagnostics(files.diagnostics_paths(chain.scale_path)[0])
    patience, min_steps = int(meta.get("patience", 0)), int(meta.get("min_steps", 0))
    since_best = int(curve.since_best.iloc[-1]) if len(curve) else None
    row: dict[str, Any] = {
        "run": chain.run.name, "preset": chain.preset, "task": chain.task, "seed": chain.seed,
        "steps": meta.get("steps"), "n_samples": meta.get("n_samples"),
        "warmup_steps": meta.get("warmup_steps"), "burnin_steps": meta.get("burnin_steps"),
        "best_val": meta.get("best_val"),
        "best_val_step": int(curve.step[curve.val_score.idxmax()]) if len(curve) else None,
        "evaluations_since_best": since_best,
        # jiant's rule ends a run past min_steps once `patience` evaluations brought nothing
        "stopped_by_patience": (since_best is not None and patience > 0
                                and since_best >= patience
                                and int(meta.get("steps", 0)) > min_steps),
    }
    for phase in PHASES:
        part = summary.get("phases", {}).get(phase) or {}
        row[f"{phase}_noise_to_data"] = part.get("noise_to_data_median")
        row[f"{phase}_noise_larger_share"] = part.get("noise_larger_share")
        row[f"{phase}_at_floor"] = part.get("at_floor")
    agreement = summary.get("rank_agreement") or {}
    row["jaccard_chance"] = agreement.get("jaccard_chance")
    for other in ("distance", "magnitude", "fisher"):
        pair = (agreement.get("pairs") or {}).get(f"lambda~{other}") or {}
        row[f"spearman_{other}"] = pair.get("spearman")
        row[f"jaccard_{other}"] = pair.get("jaccard")
    return row


def _flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in sorted(tensors)])


def _indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().reshape(-1)


ChainMasks = Mapping[Chain, Mapping[float, Mapping[str, torch.Tensor]]]


def agreement_rows(chains: Sequence[Chain], means: Mapping[Chain, Mapping[str, torch.Tensor]],
                   chain_masks: ChainMasks, other_masks: Mapping[tuple[str, int], Path]
                   ) -> list[dict[str, Any]]:
    """Rows of ``agreement.csv`` (see the module's docstring)."""
    masks = {c: {b: _flat(m) for b, m in chain_masks[c].items()} for c in chains}
    names = {c: sorted(means[c]) for c in chains}
    rows = []
    for a, b in itertools.combinations(chains, 2):
        if a.preset != b.preset and a.seed != b.seed:
            continue  # two seeds of one preset, or two presets of one seed
        rho = rank_agreement({"a": flat(means[a], names[a]),
                              "b": flat(means[b], names[b])})["pairs"]["a~b"]["spearman"]
        rows.append({"a": a.label, "b": b.label, "measure": "spearman", "budget": math.nan,
                     "value": rho})
        for budget in masks[a]:
            rows.append({"a": a.label, "b": b.label, "measure": "jaccard", "budget": budget,
                         "value": jaccard(_indices(masks[a][budget]),
                                          _indices(masks[b][budget]))})
    for chain in chains:
        for (method, seed), path in other_masks.items():
            if seed != chain.seed:
                continue
            other, meta = files.load_mask(path)
            budget = float(meta["budget"])
            if budget not in masks[chain]:
                continue
            theirs = _flat({n: other[n] for n in names[chain]})
            rows.append({"a": chain.label, "b": f"{method} seed {seed}", "measure": "jaccard",
                         "budget": budget,
                         "value": jaccard(_indices(masks[chain][budget]), _indices(theirs))})
    for row in rows:  # two random sets of p D scalars share p^2 D: Jaccard p / (2 - p)
        row["chance"] = (row["budget"] / (2 - row["budget"])
                         if row["measure"] == "jaccard" else 0.0)
    return rows


def _group(module: str, name: str) -> str:
    """The figures' module type, with the embeddings told apart by kind."""
    if module == "embeddings":
        for kind in ("word", "position", "token_type"):
            if f"{kind}_embeddings" in name:
                return f"{kind.replace('_', '-')} embeddings"
    return module


def composition_rows(chains: Sequence[Chain], means: Mapping[Chain, Mapping[str, torch.Tensor]],
                     chain_masks: ChainMasks) -> list[dict[str, Any]]:
    """Rows of ``composition.csv``: per chain, budget and group (module type, embedding kind,
    biases across modules, each layer), the selected scalars and the group's size."""
    rows = []
    for chain in chains:
        shapes = {n: t.numel() for n, t in means[chain].items()}
        total = sum(shapes.values())
        for budget, mask in chain_masks[chain].items():
            selected_total = sum(int(m.sum()) for m in mask.values())
            groups: dict[tuple[str, str], list[int]] = {}
            for name, m in mask.items():
                layer, module = parameter_location(name)
                keys = [("module", _group(module, name)), ("layer", layer)]
                if name.endswith(".bias"):
                    keys.append(("module", "biases (all)"))
                for key in keys:
                    entry = groups.setdefault(key, [0, 0])
                    entry[0] += int(m.sum())
                    entry[1] += shapes[name]
            for (by, group), (selected, size) in groups.items():
                rows.append({"chain": chain.label, "preset": chain.preset, "seed": chain.seed,
                             "budget": budget, "by": by, "group": group, "selected": selected,
                             "scalars": size, "share_of_mask": selected / selected_total,
                             "share_of_scalars": size / total})
    return rows


def other_method_masks(runs: Iterable[str | Path], task: str,
                       methods: Sequence[str] = ("lt-sft", "random", "magnitude", "fisher",
                                                 "sam")) -> dict[tuple[str, int], Path]:
    """The other methods' masks of ``task`` found in ``runs``: (method, seed) -> file, one per
    budget file name found."""
    found = {}
    for run in map(Path, runs):
        for method in methods:
            for path in sorted(run.glob(f"masks/{method}/{task}/seed*/p*.safetensors")):
                seed = int(path.parent.name.removeprefix("seed"))
                found[(f"{method} {path.stem}", seed)] = path
    return found


def compare_chains(runs: Sequence[str | Path], task: str, out_dir: str | Path,
                   budgets: Sequence[float] = BUDGETS) -> list[Path]:
    """Write the comparison of every chain of ``task`` in ``runs`` to ``out_dir``."""
    out = Path(out_dir)
    chains = find_chains(runs, task)
    loaded = {chain: files.load_scales(chain.scale_path) for chain in chains}
    means = {chain: scales for chain, (scales, _) in loaded.items()}
    chain_masks = {chain: masks_from_scores(means[chain], budgets) for chain in chains}
    curves = {chain: validation_curve(chain) for chain in chains}
    written = []

    def save(name: str, rows: list[dict[str, Any]]) -> None:
        written.append(write_table_csv(pd.DataFrame(rows), out / name))

    save("chains.csv", [chain_row(c, loaded[c][1], curves[c]) for c in chains])
    save("agreement.csv", agreement_rows(chains, means, chain_masks,
                                         other_method_masks(runs, task)))
    composition = composition_rows(chains, means, chain_masks)
    save("composition.csv", composition)
    main = 0.005 if 0.005 in budgets else budgets[0]
    written.append(plot_mask_composition(pd.DataFrame(composition),
                                         out / "mask_composition.png", main))
    written.append(plot_stage1_validation({c.label: curves[c] for c in chains},
                                          out / "stage1_validation.png"))
    return written
