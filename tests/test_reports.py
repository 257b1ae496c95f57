"""Tables from synthetic metrics.json files, figures from small masks and scales, and the
module-type parsing on the parameter names of real (tiny, random) BERT, RoBERTa and timm ViT."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from bayestune import files, reports

TASKS = ("cola", "rte", "cb")


def _metrics(tmp: Path, method: str, budget, task: str, seed: int, score: float,
             model: str = "roberta-base", fraction: float = 0.005) -> Path:
    path = tmp / method / task / str(budget) / f"seed{seed}" / "metrics.json"
    files.write_json(path, {
        "method": method, "budget": budget, "task": task, "seed": seed, "model": model,
        "metric": "accuracy", "test_score": score, "val_score": score + 0.01,
        "trainable_fraction": fraction, "n_trainable": 5, "n_total": 1000, "best_step": 10,
        "steps": 20, "wall_seconds": 1.0,
    })
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


def test_written_tables_add_published_rows_for_roberta_only(tmp_path):
    out = tmp_path / "out"
    paths = reports.write_tables(reports.collect_scores(_runs(tmp_path / "r")), out, "glue",
                                 "roberta-base")
    assert [p.name for p in paths] == ["glue_scores.csv", "glue_table.csv", "glue_table.md"]
    table = pd.read_csv(out / "glue_table.csv", dtype={"budget": str})
    published = table[table.method.str.endswith("(published)")]
    assert len(published) == len(reports.PUBLISHED_GLUE)
    sam = published[published.method == "SAM (published)"].iloc[0]
    # Only the run's tasks are shown, and avg is over them so that it compares with the run's.
    assert "wsc" not in table.columns and sam["cb"] == 88.93
    assert sam["avg"] == pytest.approx((60.89 + 76.79 + 88.93) / 3)
    every_task = reports.published_rows("FacebookAI/roberta-base").set_index("method")
    assert every_task.loc["SAM (published)", "avg"] == 77.12
    assert every_task.loc["SAM (published)", "wsc"] == 59.52
    markdown = (out / "glue_table.md").read_text()
    assert "71.00 ± 1.00" in markdown and "SAM (published)" in markdown

    other = tmp_path / "minilm"
    scores = reports.collect_scores(_runs(tmp_path / "m", "sentence-transformers/all-MiniLM-L6-v2"))
    reports.write_tables(scores, other, "glue")
    assert not pd.read_csv(other / "glue_table.csv").method.str.contains("published").any()


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
