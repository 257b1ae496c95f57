"""`make reproduce` sets several configs side by side (the paper's chain, `cold`, lambda on its
own scale, a uniform random mask) and pairs their stage-2 runs over seeds. A pairing is fair
only when everything but the mask is the same: model, data, seeds, stage-2 schedule and the
learning rates tried. The long config reruns three of those rows with stage 2 twice as long,
each at a rate of the main grid, on the main config's own chains. These checks read the
configs and the Makefile; they run nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(REPO.glob("config/reproduce*.yaml"))
SHARED = ("benchmark", "model", "model_vocabulary", "architecture", "prepared_dir", "glue_dir",
          "max_length", "tasks", "seeds", "budgets", "main_budget")
LONG = sorted(REPO.glob("config/reproduce_long*.yaml"))  # stage 2 twice as long
SAME_STAGE_2 = [p for p in CONFIGS if p not in LONG]  # the configs whose rows share one table
COUNTERPART = {"reproduce_long": "reproduce", "reproduce_long_cold": "reproduce_cold",
               "reproduce_long_lambda": "reproduce_lambda"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_the_reproduce_configs():
    assert {p.stem for p in CONFIGS} == {"reproduce", "reproduce_cold", "reproduce_lambda",
                                         "reproduce_uniform", *COUNTERPART}


@pytest.mark.parametrize("path", CONFIGS[1:], ids=lambda p: p.stem)
def test_every_side_config_shares_the_main_ones_model_data_seeds_and_stage_2(path):
    main, side = load(REPO / "config/reproduce.yaml"), load(path)
    assert {k: side.get(k) for k in SHARED} == {k: main.get(k) for k in SHARED}
    assert side["results_dir"] != main["results_dir"]  # its runs stand as their own rows


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_method_tries_the_same_number_of_rates(path):
    tuning = load(path)["tuning"]
    assert all(len(grid) == tuning["candidates"] for grid in tuning["grid"].values())


@pytest.mark.parametrize("path", SAME_STAGE_2[1:], ids=lambda p: p.stem)
def test_the_side_configs_of_the_main_table_share_its_stage_2(path):
    assert load(path)["finetune"] == load(REPO / "config/reproduce.yaml")["finetune"]


@pytest.mark.parametrize("path", LONG, ids=lambda p: p.stem)
def test_a_long_config_changes_only_stage_2s_length_on_its_counterparts_chains(path):
    main, long = load(REPO / "config/reproduce.yaml"), load(path)
    counterpart = load(REPO / f"config/{COUNTERPART[path.stem]}.yaml")
    assert long["finetune"] == {**main["finetune"], "max_steps": 2 * main["finetune"]["max_steps"]}
    # the counterpart's chains, read rather than sampled again
    assert long["scales_dir"] == f"{counterpart['results_dir']}/scales"
    assert long["sampler"] == counterpart["sampler"]
    assert long["sampler_seeds"] == counterpart["sampler_seeds"]
    for method, grid in long["tuning"]["grid"].items():
        tried = main["tuning"]["grid"].get(method, main["tuning"]["grid"]["default"])
        if method == "bayestune":
            tried = counterpart["tuning"]["grid"]["bayestune"]
        assert all(candidate in tried for candidate in grid), method


def test_the_long_rows_are_the_main_rows_they_rerun():
    long = load(REPO / "config/reproduce_long.yaml")
    # its random is the uniform null's draw, and every 6,000-step row of the verdict is rerun
    assert long["mask_by_method"] == load(REPO / "config/reproduce_uniform.yaml")["mask_by_method"]
    assert set(long["methods"]) == {"bayestune", "random", "full"}
    assert {p.stem for p in LONG} == {f"reproduce_long{s}" for s in ("", "_cold", "_lambda")}


def test_the_masked_methods_try_the_same_rates_in_every_config():
    rates = set()
    for path in SAME_STAGE_2:
        for method, grid in load(path)["tuning"]["grid"].items():
            if method != "full":
                rates.add(tuple(candidate["lr"] for candidate in grid))
    assert rates == {(3e-3, 1e-2)}


def test_the_uniform_null_draws_the_head_like_every_other_scalar():
    uniform = load(REPO / "config/reproduce_uniform.yaml")
    assert uniform["methods"] == ["random"]
    assert uniform["mask_by_method"]["random"] == {"keep_head": False}
    assert "mask_by_method" not in load(REPO / "config/reproduce.yaml")  # the published random


def test_make_reproduce_runs_every_reproduce_config():
    recipe = (REPO / "Makefile").read_text().split("\nreproduce:", 1)[1].split("\n\n", 1)[0]
    run = set(re.findall(r"--configfile (config/reproduce\w*\.yaml)", recipe))
    assert run == {f"config/{p.name}" for p in CONFIGS}
