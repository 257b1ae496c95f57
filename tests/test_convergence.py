"""The "still improving at max_steps" rule and the stop reason on constructed histories, and
the history a real (tiny) fine-tuning run writes into metrics.json."""

from __future__ import annotations

import math

import pytest

from bayestune import convergence


def _record(val_scores, stop_reason="max_steps", eval_every=10):
    history = [(eval_every * (i + 1), 1.0 / (i + 1), v) for i, v in enumerate(val_scores)]
    return {"history": convergence.history_records(history), "stop_reason": stop_reason}


@pytest.mark.parametrize("vals, stop, flagged", [
    ([0.50, 0.60, 0.70, 0.80], "max_steps", True),    # improving to the end
    ([0.50, 0.60, 0.80, 0.79], "max_steps", True),    # best at the second-to-last evaluation
    ([0.50, 0.80, 0.79, 0.78], "max_steps", False),   # best three evaluations before the end
    ([0.50, 0.60, 0.70, 0.80], "patience", False),    # stopped by patience: not flagged
    ([0.60, 0.60, 0.60, 0.60], "max_steps", False),   # flat: best is the first to reach it
    ([0.50, 0.70, 0.70, 0.70], "max_steps", False),   # levelled off: a tie is no improvement
    ([0.50, 0.60], "max_steps", True),                # two evaluations say nothing: flagged
    ([0.50, math.nan, math.nan, math.nan], "max_steps", False),  # NaN never wins
    ([math.nan, math.nan], "max_steps", False),       # no score at all
])
def test_still_improving_rule(vals, stop, flagged):
    assert convergence.still_improving(_record(vals, stop)) is flagged


def test_old_records_without_history_or_stop_reason_are_not_flagged():
    assert convergence.still_improving({"val_score": 0.8}) is False
    assert convergence.still_improving({"stop_reason": "max_steps"}) is False
    no_reason = _record([0.5, 0.6, 0.7])
    del no_reason["stop_reason"]
    assert convergence.still_improving(no_reason) is False


def test_stop_reason_counts_evaluations_after_the_best():
    history = [(10, 1.0, 0.5), (20, 0.9, 0.7), (30, 0.8, 0.6), (40, 0.7, 0.6)]
    assert convergence.stop_reason(history, best_step=20, patience=2) == "patience"
    assert convergence.stop_reason(history, best_step=20, patience=3) == "max_steps"
    assert convergence.stop_reason(history, best_step=40, patience=1) == "max_steps"


def test_history_records_are_strict_json():
    records = convergence.history_records([(5, 0.25, math.nan), (10, math.nan, 0.5)])
    assert records == [{"step": 5, "train_loss": 0.25, "val_score": None},
                       {"step": 10, "train_loss": None, "val_score": 0.5}]


def test_finetune_command_records_the_curve_and_why_it_stopped(tmp_path, glue_dir):
    """MiniLM on CB through `bayestune finetune` for six steps: the metrics.json has one
    history entry per evaluation, its best agrees with best_step and val_score, and a stop
    reason."""
    from bayestune import files
    from bayestune.cli import main

    data = tmp_path / "data"
    assert main(["-q", "prepare", "--task", "cb", "--model", "minilm", "--out-dir", str(data),
          "--data-dir", str(glue_dir), "--max-length", "32"]) == 0
    out = tmp_path / "run"
    assert main(["-q", "finetune", "--task", "cb", "--model", "minilm", "--data", str(data),
          "--seed", "0", "--out-dir", str(out), "--method", "full", "--max-steps", "6",
          "--eval-every", "2", "--patience", "5", "--batch-size", "4", "--device", "cpu"]) == 0
    record = files.read_json(out / "metrics.json")
    history = record["history"]
    assert [h["step"] for h in history] == [2, 4, 6]
    assert all(h["train_loss"] > 0 for h in history)
    best = convergence.best_evaluation([h["val_score"] for h in history])
    assert history[best]["step"] == record["best_step"]
    assert history[best]["val_score"] == pytest.approx(record["val_score"])
    assert record["stop_reason"] == "max_steps"  # patience 5 never runs out in 3 evaluations
    assert convergence.still_improving(record) == (best >= 1)  # best in the last two of three
