"""compare-chains: finished stage-1 chains side by side (what they rank by, whether their seeds
agree, where their masks sit), from the files a run wrote, on chains of a tiny encoder."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from shared_runs import tiny_encoder

from bayestune.chain_comparison import compare_chains, find_chains, validation_curve
from bayestune.cli import main
from bayestune.errors import MissingFileError

SAMPLER = ["--batch-size", "8", "--steps", "40", "--warmup-steps", "10", "--burnin-steps", "20",
           "--thinning", "2", "--device", "cpu", "--diagnostics-fisher-examples", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, glue_dir):
    """Two presets (two seeds of one, one of the other) in two results folders, laid out as
    the workflow lays them out, with each chain's log."""
    import logging

    model = str(tiny_encoder(tmp_path_factory))
    root = tmp_path_factory.mktemp("chains")
    data = root / "data" / "cb"
    assert main(["-q", "prepare", "--task", "cb", "--model", model, "--out-dir", str(data),
                 "--data-dir", str(glue_dir), "--max-length", "32"]) == 0
    chains = [("main", "exact", 0, ["--patience", "5", "--min-steps", "39",
                                        "--eval-every", "10"]),
              ("main", "exact", 1, []), ("other", "cold", 0, [])]
    for run, preset, seed, extra in chains:
        folder = root / run
        log_path = folder / "logs/sample" / preset / "cb" / f"seed{seed}.log"
        scales = folder / "scales" / preset / "cb" / f"seed{seed}.safetensors"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path)
        logger = logging.getLogger("bayestune")
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)  # the job log's level, whatever pytest set
        try:
            assert main(["--log-every", "10", "sample", "--task", "cb", "--model", model,
                         "--data", str(data), "--seed", str(seed), "--preset", preset,
                         "--out", str(scales),
                         *SAMPLER, *extra]) == 0
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            handler.close()
        assert main(["-q", "mask", "--method", "random", "--task", "cb", "--model", model,
                     "--seed", str(seed), "--budgets", "0.005",
                     "--out-dir", str(root / "main/masks/random/cb" / f"seed{seed}")]) == 0
    return root, [root / "main", root / "other"]


def test_every_chain_is_found_by_preset_and_seed(runs):
    _, folders = runs
    found = find_chains(folders, "cb")
    assert {(c.preset, c.seed) for c in found} == {("exact", 0), ("exact", 1), ("cold", 0)}
    with pytest.raises(MissingFileError, match="no scale file of task 'rte'"):
        find_chains(folders, "rte")


def test_the_comparison_writes_its_tables_and_figures(runs):
    root, folders = runs
    out = root / "analysis"
    written = compare_chains(folders, "cb", out, budgets=(0.005, 0.05))
    assert {p.name for p in written} == {"chains.csv", "agreement.csv", "composition.csv",
                                          "mask_composition.png", "stage1_validation.png"}
    chains = pd.read_csv(out / "chains.csv").set_index(["preset", "seed"])
    assert len(chains) == 3 and (chains.steps == 40).all()
    assert 0 <= chains.loc[("exact", 0), "best_val"] <= 1  # the length rule validated it
    assert math.isnan(chains.loc[("cold", 0), "best_val"])  # no length rule, no validation
    assert not chains.loc[("exact", 0), "stopped_by_patience"]  # the step limit ended it
    assert chains.loc["exact", "sampling_noise_to_data"].notna().all()
    assert math.isnan(chains.loc[("cold", 0), "sampling_noise_to_data"])  # cold has no noise
    assert (chains.jaccard_chance.round(6) == round(0.005 / 1.995, 6)).all()
    agreement = pd.read_csv(out / "agreement.csv")
    seeds = agreement[(agreement.a == "exact seed 0") & (agreement.b == "exact seed 1")]
    assert set(seeds.measure) == {"spearman", "jaccard"} and len(seeds) == 3
    presets = agreement[(agreement.a == "exact seed 0") & (agreement.b == "cold seed 0")]
    assert len(presets) == 3  # two presets of one seed compared; cold 0 against exact 1 not
    random_rows = agreement[agreement.b.str.startswith("random")]
    assert len(random_rows) == 3 and (random_rows.budget == 0.005).all()
    jaccard = agreement[agreement.measure == "jaccard"]
    assert jaccard.value.between(0, 1).all()
    assert jaccard.chance.to_numpy() == pytest.approx(
        (jaccard.budget / (2 - jaccard.budget)).to_numpy(), rel=1e-5)  # six digits in the CSV
    composition = pd.read_csv(out / "composition.csv")
    by_module = composition[composition.by == "module"]
    for _, group in by_module.groupby(["chain", "budget"]):
        parts = group[group.group != "biases (all)"]
        assert parts.share_of_mask.sum() == pytest.approx(1.0)
        assert parts.share_of_scalars.sum() == pytest.approx(1.0)
    assert {"word embeddings", "pooler", "head", "biases (all)"} <= set(by_module.group)
    for name in ("mask_composition.png", "stage1_validation.png"):
        assert (out / name).stat().st_size > 1000


def test_the_validation_curve_is_read_from_the_chain_log(runs):
    _, folders = runs
    chain = next(c for c in find_chains(folders, "cb") if c.preset == "exact" and c.seed == 0)
    curve = validation_curve(chain)
    assert list(curve.step) == [9, 19, 29, 39]  # validations when step + 1 is a multiple of 10
    assert curve.val_score.notna().all() and not math.isnan(curve.since_best.iloc[-1])
