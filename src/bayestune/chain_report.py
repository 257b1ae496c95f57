"""What `bayestune diagnose` reads and prints: the summary of a scale file (with its chain
diagnostics) or of a sampler checkpoint, and the agreement across the seeds of one task."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from bayestune import files
from bayestune.diagnostics import PHASES, flat, rank_agreement

# --- across the seeds of one task ------------------------------------------------------------
SEED_COLUMNS = ("seed_a", "seed_b", "measure", "budget", "value")


def seed_agreement(scale_paths: Sequence[str | Path],
                   mask_paths: Sequence[str | Path] = ()) -> pd.DataFrame:
    """Per pair of seeds: the Spearman correlation of their posterior-mean lambdas (on the
    fixed subset of :func:`rank_agreement`) and the Jaccard overlap of their masks at each
    budget (from the mask files, seed and budget read from their metadata)."""
    lambdas: dict[int, Tensor] = {}
    for path in scale_paths:
        scales, meta = files.load_scales(path)
        lambdas[int(meta["seed"])] = flat(scales, sorted(scales))
    rows = []
    if len(lambdas) > 1:
        pairs = rank_agreement({str(k): v for k, v in sorted(lambdas.items())})["pairs"]
        for pair, values in pairs.items():
            a, b = map(int, pair.split("~"))
            rows.append((a, b, "spearman", math.nan, values["spearman"]))
    masks: dict[float, dict[int, Tensor]] = {}
    for path in mask_paths:
        mask, meta = files.load_mask(path)
        masks.setdefault(float(meta["budget"]), {})[int(meta["seed"])] = torch.cat(
            [mask[n].reshape(-1) for n in sorted(mask)])
    for budget, by_seed in sorted(masks.items()):
        for a, b in combinations(sorted(by_seed), 2):
            inter = int((by_seed[a] & by_seed[b]).sum())
            union = int((by_seed[a] | by_seed[b]).sum())
            rows.append((a, b, "jaccard", budget, inter / union if union else math.nan))
    return pd.DataFrame(rows, columns=list(SEED_COLUMNS))


# --- bayestune diagnose ---------------------------------------------------------------------
def quantiles(values: Tensor, qs: Sequence[float] = (0.0, 0.01, 0.5, 0.99, 1.0)
              ) -> dict[str, float]:
    arr = values.detach().float().cpu().numpy()
    return {f"q{round(q * 100)}": float(v) for q, v in zip(qs, np.quantile(arr, qs), strict=True)}


def describe_scale_file(path: str | Path) -> dict[str, Any]:
    """Summary of a scale file, with its diagnostics sidecar when one is beside it."""
    scales, meta = files.load_scales(path)
    lam = torch.cat([t.reshape(-1).float() for t in scales.values()])
    floor = float(meta.get("lambda_floor", 0.0))
    out: dict[str, Any] = {
        "file": str(path), "kind": "scales", "preset": meta.get("preset"),
        "seed": meta.get("seed"), "steps": meta.get("steps"),
        "n_samples": meta.get("n_samples"), "scalars": int(lam.numel()),
        "lambda": quantiles(lam), "at_floor": float((lam <= floor).float().mean())}
    summary_path, _ = files.diagnostics_paths(path)
    if summary_path.is_file():
        diag = files.load_diagnostics(summary_path)
        out["phases"] = diag.get("phases")
        out["rank_agreement"] = diag.get("rank_agreement")
    return out


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """Summary of a sampler checkpoint: where the chain is and what it ranks so far. A
    checkpoint holds no theta0 (only its fingerprint), so |theta - theta0| is known only
    where it stores theta as changes from theta0 (``checkpoint_precision: bf16``)."""
    from bayestune.sampler import SamplerConfig

    state = files.load_checkpoint(path)
    if state is None:
        raise files.MissingFileError(f"{path}: no such checkpoint")
    if "lam" not in state or "names" not in state:
        raise files.FileFormatError(f"{path}: not a stage-1 (sampler) checkpoint")
    saved = state["config"]
    config = SamplerConfig(**{**saved, "steps": saved["burnin_steps"] + 1})
    numel = sum(math.prod(s) for s in state["shapes"])
    lam = (state["lam"].float() if state["lam"] is not None
           else torch.full((numel,), config.lambda_init))
    scores = {"lambda_now": lam.clamp_min(config.lambda_floor)}
    out: dict[str, Any] = {
        "file": str(path), "kind": "checkpoint", "preset": config.preset,
        "step": state["step"], "phase": config.phase(max(state["step"] - 1, 0)),
        "n_samples": state["count"], "scalars": int(lam.numel()), "lambda": quantiles(lam),
        "at_floor": float((lam <= config.lambda_floor).float().mean())}
    if state.get("theta_delta"):
        distance = torch.cat([d.float().reshape(-1).abs() for d in state["theta_delta"]])
        scores["distance"] = distance
        out["distance"] = quantiles(distance)
    mean = _running_mean(path, state, numel)
    if mean is not None:
        scores = {"lambda": mean, **scores}
    out["rank_agreement"] = rank_agreement(scores) if len(scores) > 1 else None
    return out


def _running_mean(path: str | Path, state: dict[str, Any], numel: int) -> torch.Tensor | None:
    """The posterior mean so far (flat, float32) of a sampler checkpoint; None before the
    first sample."""
    from bayestune.running_stats import STORED_DTYPES, RunningStats

    if not state.get("count"):
        return None
    stats = RunningStats(numel, in_memory=True, variance=False)
    with files.open_checkpoint_attachment(path, state["stats"][0]) as stream:
        stats.load(0, stream, Path(path), STORED_DTYPES[state.get("precision", "fp32")])
    return stats.region(0)


def describe(path: str | Path) -> dict[str, Any]:
    """A scale file's or a sampler checkpoint's summary (told apart by their contents)."""
    path = Path(path)
    if not path.is_file():
        raise files.MissingFileError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return describe_scale_file(path)
    if not zipfile.is_zipfile(path):  # a checkpoint is a torch.save archive
        raise files.FileFormatError(f"{path}: neither a scale file (.safetensors) nor a sampler "
                                    "checkpoint (.ckpt); diagnose reads those two")
    return describe_checkpoint(path)


def format_summary(summary: Mapping[str, Any]) -> str:
    """Plain text of :func:`describe`'s summary."""
    lines = [f"{summary['file']} ({summary['kind']}, preset {summary.get('preset')})"]
    if summary["kind"] == "checkpoint":
        lines.append(f"  step {summary['step']} ({summary['phase']}), "
                     f"{summary['n_samples']} samples so far")
    else:
        lines.append(f"  seed {summary.get('seed')}, {summary.get('steps')} steps, "
                     f"{summary.get('n_samples')} samples")
    lines.append(f"  lambda over {summary['scalars']} scalars: {_quantile_text(summary['lambda'])}"
                 f"; at the floor {summary['at_floor']:.3f}")
    if "distance" in summary:
        lines.append(f"  |theta - theta0|: {_quantile_text(summary['distance'])}")
    phases = summary.get("phases")
    if phases:
        lines.append("  phase      measured  data RMS   noise RMS  noise/data  "
                     "(median |.|: data, noise/data)  at floor")
        for name, p in ((n, phases[n]) for n in PHASES if n in phases):
            moves = "" if p["lambda_moves"] else "  (lambda fixed: what SGLD would see)"
            lines.append(f"  {name:<10} {p['steps_measured']:>8}  {p['data_rms']:<9.3g}  "
                         f"{p['noise_rms']:<9.3g}  {_num(p['noise_to_data_rms']):<10}  "
                         f"{p['data_median_abs']:<9.3g} {_num(p['noise_to_data_median']):<10}"
                         f"            {p['at_floor']:.3f}{moves}")
    agreement = summary.get("rank_agreement")
    if agreement:
        lines.append(f"  rankings (Spearman on {agreement['spearman_subset']} scalars; Jaccard "
                     f"of top {agreement['top_fraction']:.2%} sets, chance "
                     f"{agreement['jaccard_chance']:.4f}):")
        for pair, values in agreement["pairs"].items():
            lines.append(f"    {pair:<22} Spearman {_num(values['spearman'])}  "
                         f"Jaccard {values['jaccard']:.4f}")
    return "\n".join(lines)


def _quantile_text(q: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in q.items())


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"
