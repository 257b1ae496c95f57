"""The fair protocol: equal candidate counts or a refusal, the best validation candidate kept,
test scored only for it."""

from __future__ import annotations

import json
import math

import pytest
from test_defects import FINETUNE_FLAGS, prepared, tiny_model_dir  # noqa: F401 (fixtures)

from bayestune import files
from bayestune.cli import main
from bayestune.commands import common
from bayestune.errors import ConfigError
from bayestune.selection import (
    candidate_presets,
    check_equal_counts,
    choose,
    parse_candidates,
    selection_rows,
)

METHODS = ["bayestune", "full", "random"]


def test_unequal_candidate_counts_are_refused():
    fair = {"candidates": 2, "grid": {"default": [{"lr": 1e-3}, {"lr": 3e-3}],
                                      "full": [{"lr": 1e-5}, {"lr": 3e-5}],
                                      "bayestune": [{"preset": "cold", "lr": 1e-3},
                                                    {"preset": "exact", "lr": 1e-3}]}}
    assert check_equal_counts(fair, METHODS) == 2
    assert candidate_presets(fair, "reference") == ["cold", "exact"]
    # a stage-1 preset counts as a candidate: three for bayestune against two for the rest
    unfair = {"grid": {**fair["grid"], "bayestune": [*fair["grid"]["bayestune"], {"lr": 3e-3}]}}
    with pytest.raises(ConfigError, match=r"unfair tuning.*bayestune: 3, full: 2, random: 2"):
        check_equal_counts(unfair, METHODS)
    with pytest.raises(ConfigError, match="exactly 3 entries"):
        check_equal_counts({**fair, "candidates": 3}, METHODS)
    with pytest.raises(ConfigError, match="only bayestune has a stage 1"):
        check_equal_counts({"grid": {"default": [{"lr": 1e-3, "preset": "cold"}]}}, METHODS)
    with pytest.raises(ConfigError, match="unknown candidate setting.*lrr"):
        check_equal_counts({"grid": {"default": [{"lrr": 1e-3}]}}, METHODS)
    assert check_equal_counts(None, METHODS) == 1  # no tuning: one candidate each


def test_choose_takes_the_first_best_and_never_nan():
    assert choose([0.5, 0.7, 0.7, 0.1]) == 1
    assert choose([math.nan, 0.2, 0.3]) == 2
    assert choose([math.nan, math.nan]) == 0
    with pytest.raises(ConfigError, match="not JSON"):
        parse_candidates("[{lr: 1}]")


class CountingLoader:
    """A test split that counts how often it is read."""

    def __init__(self, loader) -> None:
        self.loader, self.reads = loader, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.loader)


def test_finetune_keeps_the_best_validation_candidate_and_tests_only_it(
        tmp_path, tiny_model_dir, prepared, monkeypatch):  # noqa: F811
    splits = []
    load = common.model_and_data

    def counted(args):
        spec, model, data = load(args)
        data.test = CountingLoader(data.test)
        splits.append(data.test)
        return spec, model, data

    monkeypatch.setattr(common, "model_and_data", counted)
    flags = ["-q", "finetune", "--task", "rte", "--model", tiny_model_dir, "--data",
             str(prepared["rte"]), *FINETUNE_FLAGS, "--max-steps", "4"]
    # a rate too small to move anything, one that learns, one that overshoots
    candidates = [{"lr": 1e-9}, {"lr": 3e-3}, {"lr": 0.5}]
    out = tmp_path / "grid"
    assert main([*flags, "--out-dir", str(out), "--candidates", json.dumps(candidates)]) == 0
    metrics = files.read_json(out / "metrics.json")
    tried = metrics["selection"]["candidates"]
    assert [c["settings"] for c in tried] == candidates
    vals = [c["val_score"] for c in tried]
    chosen = metrics["selection"]["chosen"]
    assert chosen == vals.index(max(vals))
    assert metrics["chosen"] == candidates[chosen] and metrics["finetune"]["lr"] == \
        candidates[chosen]["lr"]
    assert metrics["val_score"] == vals[chosen]
    assert splits[0].reads == 1  # test read once, for the chosen candidate
    assert all("test_score" not in c and c["history"] for c in tried)

    # the chosen candidate run alone gives the same model: same val, test and delta
    alone = tmp_path / "alone"
    assert main([*flags, "--out-dir", str(alone), "--lr", str(candidates[chosen]["lr"])]) == 0
    single = files.read_json(alone / "metrics.json")
    assert single["test_score"] == metrics["test_score"]
    assert single["val_score"] == metrics["val_score"]
    assert single["selection"]["chosen"] == 0 and len(single["selection"]["candidates"]) == 1

    rows = selection_rows([metrics])
    assert [r["chosen"] for r in rows] == [i == chosen for i in range(3)]
    assert [r["lr"] for r in rows] == [c["lr"] for c in candidates]
