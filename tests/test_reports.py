"""Tables from synthetic metrics.json files, figures from small masks and scales, and the
module-type parsing on the parameter names of real (tiny, random) BERT, RoBERTa and timm ViT."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from bayestune import convergence, files, paired, reports

TASKS = ("cola", "rte", "cb")


def _metrics(tmp: Path, method: str, budget, task: str, seed: int, score: float,
             model: str = "roberta-base", fraction: float = 0.005,
             curve: list[float] | None = None, stop_reason: str = "max_steps",
             published_as: str | None = None,
             published_differs: list[str] | None = None, preset: str | None = None) -> Path:
    """A metrics.json; with ``curve`` (validation scores every 10 steps) also its history and
    stop reason, as `bayestune finetune` writes them; without, as files from before that."""
    path = tmp / method / (preset or "") / task / str(budget) / f"seed{seed}" / "metrics.json"
    record = {
        "method": method, "budget": budget, "task": task, "seed": seed, "model": model,
        "metric": "accuracy", "test_score": score, "val_score": score + 0.01,
        "trainable_fraction": fraction, "n_trainable": 5, "n_total": 1000, "best_step": 10,
        "steps": 20, "wall_seconds": 1.0, "published_as": published_as,
    }
    if published_differs is not None:
        record["published_differs"] = published_differs
    if preset is not None:
        record["chosen"] = {"preset": preset, "lr": 1e-3}
    if curve is not None:
        record["history"] = convergence.history_records(
            (10 * (i + 1), 1.0 / (i + 1), val) for i, val in enumerate(curve))
        record["stop_reason"] = stop_reason
    files.write_json(path, record)
    return path


def _runs(tmp: Path, model: str = "roberta-base") -> list[Path]:
    """bayestune at two budgets, full; three seeds; score = 0.5 + task index/10 + seed/100."""
    paths = []
    for seed in range(3):
        for t, task in enumerate(TASKS):
            base = 0.5 + t / 10 + seed / 100
            paths.append(_metrics(tmp, "bayestune", 0.005, task, seed, base, model))
            paths.append(_metrics(tmp, "bayestune", 0.01, task, seed, base + 0.05, model, 0.01))
            paths.append(_metrics(tmp, "full", "full", task, seed, base + 0.1, model, 1.0))
    return paths


def test_collect_scores_long_form(tmp_path):
    scores = reports.collect_scores(_runs(tmp_path))
    assert len(scores) == 27
    assert {"method", "budget", "task", "seed", "metric", "score"} <= set(scores.columns)
    assert set(scores["budget"]) == {"0.005", "0.01", "-"}
    row = scores[(scores.method == "bayestune") & (scores.budget == "0.005") &
                 (scores.task == "cb") & (scores.seed == 2)]
    assert row["score"].item() == pytest.approx(100 * (0.5 + 0.2 + 0.02))


def test_collect_scores_rejects_bad_input(tmp_path):
    bad = tmp_path / "metrics.json"
    files.write_json(bad, {"method": "full", "task": "cb"})
    with pytest.raises(files.FileFormatError, match="missing budget"):
        reports.collect_scores([bad])
    with pytest.raises(ValueError, match="no metrics.json"):
        reports.collect_scores([])
    path = _metrics(tmp_path, "full", "full", "cb", 0, 0.5)
    with pytest.raises(ValueError, match="two runs of full"):
        reports.collect_scores([path, path])


def test_runs_of_several_chains_are_named_by_preset(tmp_path):
    """Two results folders' bayestune runs (one chain each) side by side, paired by seed."""
    paths = []
    for seed in range(3):
        paths += [_metrics(tmp_path, "bayestune", 0.005, "cola", seed, 0.3 + seed / 100,
                           preset="reference"),
                  _metrics(tmp_path, "bayestune", 0.005, "cola", seed, 0.2, preset="cold"),
                  _metrics(tmp_path, "full", "full", "cola", seed, 0.1, fraction=1.0)]
    with pytest.raises(ValueError, match="two runs of bayestune"):
        reports.collect_scores(paths)
    scores = reports.collect_scores(paths, label_presets=True)
    assert set(scores.method) == {"bayestune (reference)", "bayestune (cold)", "full"}
    differences = reports.paired_table(scores, reference="bayestune (reference)")
    by_method = differences.set_index("method")["mean_difference"]
    assert by_method["bayestune (cold)"] == pytest.approx(100 * (0.1 + 0.01))
    assert by_method["full"] == pytest.approx(100 * (0.2 + 0.01))
    table = reports.make_table(scores, "glue")
    assert list(table.method)[0] == "full" and set(table.method[1:]) == {
        "bayestune (reference)", "bayestune (cold)"}


def test_table_means_stds_and_average(tmp_path):
    table = reports.make_table(reports.collect_scores(_runs(tmp_path)), "glue")
    # full ("-") first, then budgets ascending; task columns in the benchmark's order.
    assert list(zip(table.method, table.budget, strict=True)) == [
        ("full", "-"), ("bayestune", "0.005"), ("bayestune", "0.01")]
    assert [c for c in table.columns if c in TASKS] == ["cola", "rte", "cb"]
    row = table.iloc[1]
    seeds = [0.0, 1.0, 2.0]
    assert row["cb"] == pytest.approx(100 * 0.7 + 1.0)  # mean over seeds of 70, 71, 72
    assert row["cb_std"] == pytest.approx(pd.Series(seeds).std())
    assert row["avg"] == pytest.approx((51 + 61 + 71) / 3)
    assert row["seeds"] == 3
    assert table.iloc[0]["trainable_fraction"] == 1.0


def _published_runs(tmp: Path, model: str = "roberta-base") -> list[Path]:
    """Runs that record the published row of their definition (as `finetune` writes them):
    full and sam match theirs; lt-sft and bayestune have none; one random seed ran with
    changed settings (no label), so random gets no published row either."""
    paths = []
    for seed in range(2):
        for task in TASKS:
            paths += [
                _metrics(tmp, "full", "full", task, seed, 0.7, model, 1.0,
                         published_as="full fine-tuning"),
                _metrics(tmp, "sam", 0.005, task, seed, 0.6, model, 0.006, published_as="SAM"),
                _metrics(tmp, "sam", 0.01, task, seed, 0.6, model, 0.011, published_as="SAM"),
                _metrics(tmp, "lt-sft", 0.005, task, seed, 0.5, model),
                _metrics(tmp, "bayestune", 0.005, task, seed, 0.8, model),
                _metrics(tmp, "random", 0.005, task, seed, 0.4, model, 0.006,
                         published_as="random mask" if seed == 0 else None),
                _metrics(tmp, "magnitude", 0.005, task, seed, 0.4, model, 0.006,
                         published_differs=["stage-2 lr 0.001, published 0.0001"]),
            ]
    return paths


def test_published_rows_stand_only_beside_the_same_definition(tmp_path):
    out = tmp_path / "out"
    scores = reports.collect_scores(_published_runs(tmp_path / "r"))
    paths = reports.write_tables(scores, out, "glue", "roberta-base")
    assert [p.name for p in paths] == ["glue_scores.csv", "glue_table.csv", "glue_table.md",
                                       "glue_paired.csv"]
    table = pd.read_csv(out / "glue_table.csv", dtype={"budget": str})
    assert list(zip(table.method, table.budget, strict=True)) == [
        ("full", "-"), ("full fine-tuning (published)", "-"),
        ("random", "0.005"), ("magnitude", "0.005"), ("lt-sft", "0.005"), ("sam", "0.005"),
        ("SAM (published)", "0.005"), ("bayestune", "0.005"), ("sam", "0.01")]
    sam = table[table.method == "SAM (published)"].iloc[0]
    # Only the run's tasks are shown, and avg is over them so that it compares with the run's.
    assert "wsc" not in table.columns and sam["cb"] == 88.93
    assert sam["avg"] == pytest.approx((60.89 + 76.79 + 88.93) / 3)
    every_task = reports.published_rows("FacebookAI/roberta-base").set_index("method")
    assert every_task.loc["SAM (published)", "avg"] == 77.12
    assert every_task.loc["SAM (published)", "wsc"] == 59.52
    assert "MixOut (published)" not in every_task.index
    assert set(reports.NOT_RUN) == {"MixOut", "Adapter", "Diff Pruning", "Child Pruning"}
    markdown = (out / "glue_table.md").read_text()
    assert "SAM (published)" in markdown and "MixOut" not in markdown.split("\n\n")[0]
    assert "not run here: MixOut, Adapter, Diff Pruning, Child Pruning" in markdown
    # each of our rows whose published row is left out says why
    assert ("- no published row beside magnitude 0.005 (magnitude pruning): stage-2 lr 0.001, "
            "published 0.0001") in markdown
    assert "- no published row beside random 0.005 (random mask): its runs record no match" \
        in markdown
    assert "beside sam 0.005" not in markdown and "beside lt-sft" not in markdown

    other = tmp_path / "minilm"
    scores = reports.collect_scores(_published_runs(tmp_path / "m",
                                                    "sentence-transformers/all-MiniLM-L6-v2"))
    reports.write_tables(scores, other, "glue")
    assert not pd.read_csv(other / "glue_table.csv").method.str.contains("published").any()
    assert "published" not in (other / "glue_table.md").read_text()


def test_old_metrics_without_the_definition_get_no_published_row(tmp_path):
    out = tmp_path / "out"
    reports.write_tables(reports.collect_scores(_runs(tmp_path / "r")), out, "glue",
                         "roberta-base")
    table = pd.read_csv(out / "glue_table.csv", dtype={"budget": str})
    assert not table.method.str.endswith("(published)").any()
    assert "71.00 ± 1.00" in (out / "glue_table.md").read_text()


def test_vtab_table_has_group_means(tmp_path):
    paths = [_metrics(tmp_path, "bayestune", 0.005, task, 0, score)
             for task, score in (("vtab-cifar", 0.6), ("vtab-dtd", 0.8),
                                 ("vtab-eurosat", 0.9), ("vtab-kitti", 0.5))]
    reports.write_tables(reports.collect_scores(paths), tmp_path, "vtab", "vit")
    row = pd.read_csv(tmp_path / "vtab_table.csv").iloc[0]
    assert row["Natural"] == pytest.approx(70.0)
    assert row["Specialized"] == pytest.approx(90.0)
    assert row["Structured"] == pytest.approx(50.0)
    assert row["avg"] == pytest.approx(70.0)
    assert "Natural" in (tmp_path / "vtab_table.md").read_text()


def _tiny_encoders() -> dict[str, dict[str, torch.Size]]:
    import timm
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, vocab_size=200)
    models = {
        "bert": BertModel(BertConfig(**small)),
        "roberta": RobertaModel(RobertaConfig(**small)),
        "vit": timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32,
                                 embed_dim=32, depth=2, num_heads=2, num_classes=0),
    }
    return {kind: {f"encoder.{n}": p.shape for n, p in m.named_parameters()}
            for kind, m in models.items()}


@pytest.fixture(scope="module")
def encoders():
    return _tiny_encoders()


@pytest.mark.parametrize("kind", ["bert", "roberta", "vit"])
def test_module_types_of_real_parameter_names(encoders, kind):
    shapes = {**encoders[kind], "head.out_proj.weight": torch.Size([3, 32])}
    locations = {name: reports.parameter_location(name) for name in shapes}
    assert "other" not in {module for _, module in locations.values()}
    assert locations["head.out_proj.weight"] == ("head", "head")
    mask = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    frame = reports.mask_locations(mask)
    for layer in ("0", "1"):
        modules = set(frame[frame.layer == layer].module)
        # timm's fused qkv is split into q, k, v by rows
        assert modules == {"attn q", "attn k", "attn v", "attn out", "ffn in", "ffn out",
                           "layernorm"}
    assert set(frame[frame.layer == "emb"].module) == {"embeddings", "layernorm"} - (
        {"layernorm"} if kind == "vit" else set())
    assert frame["total"].sum() == sum(math.prod(s) for s in shapes.values())
    qkv = frame[(frame.layer == "0") & frame.module.isin(["attn q", "attn k", "attn v"])]
    assert qkv["total"].nunique() == 1  # q, k and v are the same size


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100


def test_figures_from_files(tmp_path, encoders):
    shapes = encoders["bert"]
    gen = torch.Generator().manual_seed(0)
    scales = {n: torch.rand(s, generator=gen) * 1e-3 for n, s in shapes.items()}
    scale_path = tmp_path / "scales" / "cb" / "seed0.safetensors"
    files.save_scales(scale_path, scales, {"seed": 0})
    mask_paths = []
    for method in ("bayestune", "random"):
        mask = {n: torch.rand(s, generator=gen) < 0.01 for n, s in shapes.items()}
        path = tmp_path / "masks" / method / "cb" / "seed0" / "p0.01.safetensors"
        files.save_mask(path, mask, {"method": method, "task": "cb", "budget": 0.01, "seed": 0})
        mask_paths.append(path)
    out = tmp_path / "figures"
    written = reports.write_figures(out, scales=[scale_path], masks=mask_paths)
    assert sorted(p.name for p in written) == [
        "lambda_histogram.png", "mask_locations.png", "mask_overlap.png"]
    for path in written:
        _png_ok(path)

    scores = reports.collect_scores(_runs(tmp_path / "runs"))
    csv = reports.write_tables(scores, tmp_path, "glue")[0]
    _png_ok(reports.write_figures(out, scores_csv=csv)[0])
    with pytest.raises(ValueError, match="nothing to plot"):
        reports.write_figures(out)


def test_overlap_of_identical_and_disjoint_masks(tmp_path):
    a = {"encoder.x": torch.tensor([True, True, False, False])}
    b = {"encoder.x": torch.tensor([False, False, True, True])}
    from bayestune.methods import mask_overlap

    table = mask_overlap({"a": a, "a2": a, "b": b})
    assert table.loc["a", "a2"] == 1.0 and table.loc["a", "b"] == 0.0
    _png_ok(reports.plot_mask_overlap({"a": a, "a2": a, "b": b}, tmp_path / "o.png"))


# --- convergence flags, paired differences, their figures --------------------------------------
RISING, LEVELLED = [0.5, 0.6, 0.7, 0.8], [0.5, 0.8, 0.7, 0.7]


def _curved_runs(tmp: Path) -> list[Path]:
    """bayestune at 0.005 and full on cb and rte, two seeds; only bayestune's cb seed 1 stops
    at max_steps still rising; full's rte seed 0 rises too but was stopped by patience."""
    paths = []
    for seed in range(2):
        for t, task in enumerate(("cb", "rte")):
            rising = (task, seed) == ("cb", 1)
            paths.append(_metrics(tmp, "bayestune", 0.005, task, seed, 0.6 + t / 10 + seed / 100,
                                  curve=RISING if rising else LEVELLED))
            paths.append(_metrics(tmp, "full", "full", task, seed, 0.5 + t / 10, fraction=1.0,
                                  curve=RISING if (task, seed) == ("rte", 0) else LEVELLED,
                                  stop_reason="patience"))
    return paths


def test_dagger_marks_cells_with_a_run_still_improving(tmp_path):
    scores = reports.collect_scores(_curved_runs(tmp_path / "runs"))
    assert scores["still_improving"].sum() == 1
    assert set(scores["stop_reason"]) == {"max_steps", "patience"}
    out = tmp_path / "out"
    reports.write_tables(scores, out, "glue")
    table = pd.read_csv(out / "glue_table.csv", dtype={"budget": str}).set_index("method")
    assert table.loc["bayestune", "cb_improving"] == 1
    assert table.loc["bayestune", "rte_improving"] == 0
    assert table.loc["full", ["cb_improving", "rte_improving"]].tolist() == [0, 0]
    markdown = (out / "glue_table.md").read_text()
    main_table = markdown.split("\n\n")[0]
    lines = [[cell.strip() for cell in line.split("|")[1:-1]] for line in main_table.splitlines()]
    rows = {cells[0]: dict(zip(lines[0], cells, strict=True)) for cells in lines[2:]}
    assert rows["bayestune"]["cb"] == "60.50 ± 0.71 †"
    assert "†" not in rows["bayestune"]["rte"] and "†" not in "".join(rows["full"].values())
    assert "† at least one seed of this cell stopped at max_steps while still improving" in markdown
    assert "Runs flagged: 1 of the 8 with a recorded validation curve." in markdown


def test_metrics_without_history_still_load_unflagged(tmp_path):
    paths = _runs(tmp_path / "runs")
    scores = reports.collect_scores(paths)
    assert not scores["still_improving"].any() and set(scores["stop_reason"]) == {""}
    reports.write_tables(scores, tmp_path, "glue")
    markdown = (tmp_path / "glue_table.md").read_text()
    assert "†" not in markdown
    ours = pd.read_csv(tmp_path / "glue_table.csv").query("~method.str.contains('published')")
    assert (ours.filter(like="_improving") == 0).all().all() and len(ours) == 3
    assert reports.collect_histories(paths).empty
    written = reports.write_figures(tmp_path / "fig", metrics=paths[:9])  # seed 0, 3 tasks
    assert [p.name for p in written] == ["val_curves_cb.png", "val_curves_cola.png",
                                         "val_curves_rte.png"]
    _png_ok(written[0])  # says that no curve was recorded rather than failing the report


def test_paired_differences_in_the_markdown_and_csv(tmp_path):
    reports.write_tables(reports.collect_scores(_runs(tmp_path / "runs")), tmp_path, "glue")
    table = reports.read_paired(tmp_path / "glue_paired.csv")
    # _runs: full scores 10 points above bayestune 0.005 on every (task, seed); only 0.005 is
    # bayestune's main budget, so its 0.01 runs meet no other method.
    assert len(table) == 1
    row = table.iloc[0]
    assert (row.reference, row.reference_budget, row.method, row.budget, row.pairs) == (
        "bayestune", "0.005", "full", "-", 9)
    assert row.mean_difference == pytest.approx(-10.0)
    assert (row.ci_low, row.ci_high) == pytest.approx((-10.0, -10.0))
    assert row.ci_method == paired.CI_EQUAL
    markdown = (tmp_path / "glue_table.md").read_text()
    assert "## bayestune minus method" in markdown
    assert "| full     | -        | 0.005" in markdown
    assert "-10.00" in markdown and "[-10.00, -10.00] all equal" in markdown
    assert "BCa, 9999 resamples" in markdown

    reports.write_tables(reports.collect_scores(_runs(tmp_path / "runs")), tmp_path / "other",
                         "glue", reference="lora")
    assert reports.read_paired(tmp_path / "other" / "glue_paired.csv").empty
    assert "No comparison: lora" in (tmp_path / "other" / "glue_table.md").read_text()


def test_val_curve_and_paired_figures(tmp_path):
    paths = _curved_runs(tmp_path / "runs")
    histories = reports.collect_histories(paths)
    assert len(histories) == 8 * len(RISING)
    assert histories["val_score"].max() == pytest.approx(80.0)  # x100, as in the tables
    scores = reports.collect_scores(paths)
    reports.write_tables(scores, tmp_path, "glue")
    cb_runs = [p for p in paths if "/cb/" in p.as_posix()]
    out = tmp_path / "figures"
    written = reports.write_figures(out, metrics=cb_runs,
                                    paired_csv=tmp_path / "glue_paired.csv")
    assert [p.name for p in written] == ["val_curves.png", "paired_differences.png"]
    for path in written:
        _png_ok(path)
        assert path.stat().st_size > 15_000  # drawn curves and intervals, not an empty frame
    with pytest.raises(files.FileFormatError, match="not a paired-differences table"):
        reports.read_paired(tmp_path / "glue_scores.csv")
