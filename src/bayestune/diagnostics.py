"""Chain diagnostics: does a stage-1 chain rank the scalars by the data, or by its noise?

Lambda's SGLD gradient has two parts: the data/prior part dU/dlambda (the prior's terms and
the |theta - theta0| / lambda^2 term, through which the data reaches lambda) and the noise
``noise_scale * xi``. Adam divides both by the same second moment, so their ratio before the
optimiser decides whether the posterior mean ranks scalars by their movement or at random.
:class:`ChainMonitor` measures both every ``every``-th step, per phase, and keeps traces of a
fixed subset of lambdas; :func:`rank_agreement` compares the posterior mean with other
rankings (movement, magnitude, Fisher) at the end of the chain. What `bayestune diagnose`
prints is in :mod:`bayestune.chain_report` (kept apart: stage 1 runs this module, so its code
hash decides reruns of stage 1, and a change to a printout should not). docs/ALGORITHM.md,
section "Diagnostics", says how to read the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor

from bayestune import files

if TYPE_CHECKING:
    from bayestune.sampler import Sampler

log = logging.getLogger(__name__)

MEASURE_EVERY = 10          # steps between measurements of lambda's gradient (at most)
TRACE_SIZE = 1000           # lambdas whose values are traced
MEDIAN_SUBSET = 100_000     # scalars whose |gradient| gives the median (and the floor share)
RANK_SUBSET = 1_000_000     # scalars whose ranks give the Spearman correlations
TOP_FRACTION = 0.005        # the top-p sets compared by Jaccard overlap
NOISE_WARNING = 10.0        # noise/data (medians) in the sampling phase that flags a run
PHASES = ("warm-up", "burn-in", "sampling")
HALF_NORMAL_MEDIAN = 0.6744897501960817  # median |xi| of a standard normal xi
# Fixed seeds, apart from any run's: every run of a model traces and ranks the same scalars.
TRACE_SEED, MEDIAN_SEED, RANK_SEED = 1, 2, 3


def fixed_subset(numel: int, size: int, seed: int) -> Tensor:
    """Sorted distinct flat indices, about ``size`` of them (all when ``numel <= size``),
    the same for every call with the same arguments."""
    if numel <= size:
        return torch.arange(numel)
    generator = torch.Generator().manual_seed(seed)
    return torch.unique(torch.randint(numel, (size,), generator=generator))


@dataclass
class PhaseTally:
    """Sums over the measured steps of one phase."""

    first: int
    last: int
    measured: int = 0
    data_rms: float = 0.0
    data_median: float = 0.0
    at_floor: float = 0.0
    noise_wins: float = 0.0

    def add(self, step: int, rms: float, median: float, at_floor: float,
            noise_wins: float) -> None:
        self.last = step
        self.measured += 1
        self.data_rms += rms
        self.data_median += median
        self.at_floor += at_floor
        self.noise_wins += noise_wins

    def summary(self, noise_scale: float, lambda_moves: bool) -> dict[str, Any]:
        n = max(self.measured, 1)
        rms, median = self.data_rms / n, self.data_median / n
        noise_median = noise_scale * HALF_NORMAL_MEDIAN
        return {
            "first_step": self.first, "last_measured_step": self.last,
            "steps_measured": self.measured, "lambda_moves": lambda_moves,
            "data_rms": rms, "data_median_abs": median,
            "noise_rms": noise_scale, "noise_median_abs": noise_median,
            "noise_to_data_rms": _ratio(noise_scale, rms),
            "noise_to_data_median": _ratio(noise_median, median),
            "at_floor": self.at_floor / n, "noise_larger_share": self.noise_wins / n,
        }


def _ratio(a: float, b: float) -> float | None:
    if b > 0:
        return a / b
    return None if a == 0 else math.inf


@dataclass
class ChainMonitor:
    """Watches a stage-1 chain (the sampler calls it before and after each step).

    Before every ``every``-th step (default 10; a tenth of a run under 100 steps) it evaluates
    dU/dlambda at the state that step starts from, which is exactly the data/prior part of
    the gradient the step hands lambda's optimiser, and records its RMS over all scalars and,
    over a fixed subset, its median |.|, the share at the floor and the share whose |.| is
    below the noise's RMS. The noise part is ``noise_scale * xi`` with xi standard normal:
    RMS ``noise_scale``, median |.| 0.674 ``noise_scale`` (closed form, never drawn). After
    every ``trace_every``-th step (default: the thinning) it copies max(lambda, floor) of
    :data:`TRACE_SIZE` fixed scalars. A sampler checkpoint carries what the monitor saw so far
    (:meth:`state_dict`), so a resumed run's diagnostics cover the whole chain; ``resumed_at``
    lists the steps it was resumed at.
    """

    every: int | None = None
    trace_every: int | None = None
    phases: dict[str, PhaseTally] = field(default_factory=dict)
    measured: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    trace_steps: list[int] = field(default_factory=list)
    trace_values: list[Tensor] = field(default_factory=list)
    started_at: int | None = None
    theta0: Tensor | None = None
    resumed_at: list[int] = field(default_factory=list)

    def attach(self, sampler: Sampler) -> None:
        """Bind to a new sampler (before any checkpoint is resumed into it)."""
        numel = sampler.layout.numel
        self.theta0 = sampler.theta0_flat  # the sampler's own buffer: no copy
        self.names, self.floor = list(sampler.names), sampler.config.lambda_floor
        self.noise_scale = sampler.noise_lam
        self.config = sampler.config
        self.trace_every = self.trace_every or sampler.config.thinning
        # A short run is measured more often, so that each phase gets a few measurements.
        shortest = sampler.config.shortest_run
        self.every = self.every or (MEASURE_EVERY if shortest >= 100 else max(1, shortest // 10))
        self.trace_index = fixed_subset(numel, TRACE_SIZE, TRACE_SEED).to(sampler.device)
        # The median's subset, cut by parameter tensor: (tensor number, local indices).
        subset = fixed_subset(numel, MEDIAN_SUBSET, MEDIAN_SEED)
        offsets = torch.tensor([0, *np.cumsum(sampler.sizes)])
        self.median_index = []
        for i in range(len(sampler.sizes)):
            local = subset[(subset >= offsets[i]) & (subset < offsets[i + 1])] - offsets[i]
            if local.numel():
                self.median_index.append((i, local.to(sampler.device)))

    @torch.no_grad()
    def before_step(self, sampler: Sampler) -> None:
        if self.started_at is None:
            self.started_at = sampler.step
        step = sampler.step
        if step % self.every:
            return
        values = self._lambda_gradient(sampler)
        phase = sampler.config.phase(step)
        self.phases.setdefault(phase, PhaseTally(first=step, last=step)).add(step, *values)
        self.measured.append((step, *values))

    def _lambda_gradient(self, sampler: Sampler) -> tuple[float, float, float, float]:
        """RMS of dU/dlambda over all scalars; over the subset its median |.|, the share at
        the floor and the share whose |dU/dlambda| is below the noise's RMS."""
        prior = sampler.prior
        sumsq = torch.zeros((), dtype=torch.float64, device=sampler.device)
        picked, lam_picked = [], []
        chosen = dict(self.median_index)
        for i, (p, theta0, lam) in enumerate(zip(sampler.params, sampler.theta0s,
                                                 sampler.lams, strict=True)):
            grad = prior.grad_lambda(p.detach(), theta0, lam.detach())
            sumsq += torch.linalg.vector_norm(grad).double().square()
            if i in chosen:
                picked.append(grad.reshape(-1)[chosen[i]])
                lam_picked.append(lam.detach().reshape(-1)[chosen[i]])
        rms = math.sqrt(float(sumsq) / sampler.layout.numel)
        size = torch.cat(picked).abs().float()
        at_floor = float((torch.cat(lam_picked) <= self.floor).float().mean())
        noise_wins = float((size < self.noise_scale).float().mean())
        return rms, float(size.median()), at_floor, noise_wins

    @torch.no_grad()
    def after_step(self, sampler: Sampler) -> None:
        done = sampler.step - 1
        if done % self.trace_every and sampler.step != sampler.limit:
            return
        lam = sampler.lam_flat.detach()[self.trace_index].clamp_min(self.floor)
        self.trace_steps.append(done)
        self.trace_values.append(lam.float().cpu())

    # --- in a sampler checkpoint ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What was measured and traced so far, in plain types (a checkpoint loads with
        ``weights_only``)."""
        return {"every": self.every, "trace_every": self.trace_every,
                "started_at": self.started_at, "resumed_at": list(self.resumed_at),
                "phases": {name: dataclasses.asdict(t) for name, t in self.phases.items()},
                "measured": [list(m) for m in self.measured],
                "trace_steps": list(self.trace_steps),
                "trace_values": (torch.stack(self.trace_values) if self.trace_values
                                 else None)}

    def load_state_dict(self, state: dict[str, Any] | None, *, resumed_at: int) -> None:
        """Go on from a checkpoint's record (None: a checkpoint written without a monitor, so
        the diagnostics start at the resume, which the summary then says)."""
        self.resumed_at.append(resumed_at)
        if state is None:
            log.warning("the checkpoint holds no chain diagnostics; they cover step %d on",
                        resumed_at)
            return
        self.every, self.trace_every = state["every"], state["trace_every"]
        self.started_at = state["started_at"]
        self.resumed_at = [*state["resumed_at"], resumed_at]
        self.phases = {name: PhaseTally(**t) for name, t in state["phases"].items()}
        self.measured = [tuple(m) for m in state["measured"]]
        self.trace_steps = list(state["trace_steps"])
        values = state["trace_values"]
        self.trace_values = list(values) if values is not None else []

    # --- at the end ---------------------------------------------------------------------------
    def phase_summary(self) -> dict[str, dict[str, Any]]:
        return {name: self.phases[name].summary(self.noise_scale, name != "warm-up")
                for name in PHASES if name in self.phases}

    def traces(self) -> dict[str, Tensor]:
        steps = torch.tensor([m[0] for m in self.measured], dtype=torch.int64)
        values = torch.tensor([m[1:] for m in self.measured], dtype=torch.float64).reshape(-1, 4)
        lam = (torch.stack(self.trace_values) if self.trace_values
               else torch.empty(0, self.trace_index.numel()))
        return {"indices": self.trace_index.cpu(),
                "steps": torch.tensor(self.trace_steps, dtype=torch.int64), "lambda": lam,
                "measured_steps": steps, "data_rms": values[:, 0],
                "data_median_abs": values[:, 1], "at_floor": values[:, 2],
                "noise_larger_share": values[:, 3]}

    def final_scores(self, model: torch.nn.Module, mean: Mapping[str, Tensor],
                     fisher: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Flat CPU scores at the end of the chain: posterior-mean lambda, |theta - theta0|
        (the model holds the last theta), |theta0| and, when given, Fisher."""
        params = dict(model.named_parameters())
        theta = torch.cat([params[n].detach().reshape(-1).cpu() for n in self.names])
        theta0 = self.theta0.cpu()
        scores = {"lambda": flat(mean, self.names), "distance": (theta - theta0).abs_(),
                  "magnitude": theta0.abs()}
        if fisher is not None:
            scores["fisher"] = flat(fisher, self.names)
        return scores


def flat(tensors: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.cat([tensors[n].detach().reshape(-1).float().cpu() for n in names])


# --- rankings compared ---------------------------------------------------------------------------
def top_set(scores: Tensor, fraction: float) -> Tensor:
    """Flat indices of the top ``fraction`` of the scalars (ties broken by position)."""
    k = max(1, int(fraction * scores.numel()))
    return torch.topk(scores.float(), k, sorted=False).indices


def jaccard(a: Tensor, b: Tensor) -> float:
    inter = np.intersect1d(a.numpy(), b.numpy(), assume_unique=True).size
    return inter / (a.numel() + b.numel() - inter)


def rank_agreement(scores: Mapping[str, Tensor], *, fraction: float = TOP_FRACTION,
                   subset: int = RANK_SUBSET) -> dict[str, Any]:
    """Spearman correlation (average ranks for ties, on a fixed random subset of the scalars)
    and Jaccard overlap of the top-``fraction`` sets (over all scalars) for each pair. Two
    random sets of p D scalars share p^2 D: Jaccard p / (2 - p) by chance."""
    names = list(scores)
    numel = next(iter(scores.values())).numel()
    index = fixed_subset(numel, subset, RANK_SEED)
    sample = np.stack([scores[n][index].double().numpy() for n in names], axis=1)
    rho = np.ones((len(names), len(names)))
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")  # a constant score: no correlation, reported as None
        if len(names) == 2:
            rho[0, 1] = rho[1, 0] = spearmanr(sample[:, 0], sample[:, 1]).statistic
        elif len(names) > 2:
            rho = spearmanr(sample).statistic
    tops = {n: top_set(scores[n], fraction) for n in names}
    pairs = {}
    for (i, a), (j, b) in combinations(enumerate(names), 2):
        pairs[f"{a}~{b}"] = {"spearman": _finite(rho[i, j]), "jaccard": jaccard(tops[a], tops[b])}
    return {"scalars": numel, "spearman_subset": int(index.numel()), "top_fraction": fraction,
            "jaccard_chance": fraction / (2 - fraction), "pairs": pairs}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # a constant score has no rank correlation


# --- the summary beside a scale file -------------------------------------------------------------
def chain_summary(monitor: ChainMonitor, agreement: Mapping[str, Any] | None, *,
                  run: Mapping[str, Any]) -> dict[str, Any]:
    """What the diagnostics file holds: the run, per-phase gradient sizes, the agreement."""
    return {**run, "measure_every": monitor.every, "trace_every": monitor.trace_every,
            "started_at_step": monitor.started_at, "resumed_at_steps": monitor.resumed_at,
            "noise_scale": monitor.noise_scale,
            "phases": monitor.phase_summary(), "rank_agreement": agreement}


def write_chain_diagnostics(scale_path: str | Path, monitor: ChainMonitor,
                            agreement: Mapping[str, Any] | None, *,
                            run: Mapping[str, Any]) -> dict[str, Any]:
    """Write the summary and the traces beside ``scale_path``; warn when noise outweighs the
    data part more than :data:`NOISE_WARNING` times in the sampling phase."""
    summary_path, traces_path = files.diagnostics_paths(scale_path)
    summary = chain_summary(monitor, agreement, run={**run, "scale_file": str(scale_path)})
    config = monitor.config
    files.save_traces(traces_path, monitor.traces(), {
        "warmup_steps": config.warmup_steps, "burnin_steps": config.burnin_steps,
        "lambda_floor": config.lambda_floor, "lambda_init": config.lambda_init,
        "noise_scale": monitor.noise_scale, "preset": config.preset,
        "scale_file": str(scale_path)})
    files.save_diagnostics(summary_path, summary)
    ratio = noise_to_data(summary)
    if ratio is not None and ratio > NOISE_WARNING:
        sampling = summary["phases"]["sampling"]
        log.warning("stage 1 of %s, seed %s (%s): in the sampling phase lambda's noise is %.3g "
                    "times its data/prior gradient (medians of |.|; %.0f%% of scalars feel more "
                    "noise than gradient), so the posterior mean ranks scalars mostly by noise; "
                    "see %s", run.get("task"), run.get("seed"), scale_path, ratio,
                    100 * sampling["noise_larger_share"], summary_path)
    return summary


def noise_to_data(summary: Mapping[str, Any], phase: str = "sampling") -> float | None:
    """Median |noise| over median |data/prior part| in ``phase``: the typical scalar's odds
    (the RMS is ruled by the few lambdas just above the floor, where |theta - theta0| /
    lambda^2 is huge)."""
    return (summary.get("phases", {}).get(phase) or {}).get("noise_to_data_median")
