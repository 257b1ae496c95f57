"""Tasks declared in a config or task file: validation (package and schema), every data
format, labels compared as text, the val cut, the token cache's key, image layouts, the CLI."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits
from task_data import REVIEWS_DECLARATION, review_rows, write_reviews, write_split

from bayestune.cli import main
from bayestune.files import load_token_cache
from bayestune.tasks import (
    build_task_model,
    check_task_names,
    get_task,
    load_task_data,
    prepare_task,
    tokens,
)
from bayestune.tasks import glue as glue_tasks
from bayestune.tasks.base import TaskError, split_train_val
from bayestune.tasks.custom import label_text, parse_custom_tasks, read_task_file

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
TINY_VIT = "vit_tiny_patch16_224?pretrained=false&img_size=32&patch_size=8&depth=2"


def declare(folder: Path | str, **changes) -> dict:
    declaration = {**copy.deepcopy(REVIEWS_DECLARATION), "data": str(folder), **changes}
    return {k: v for k, v in declaration.items() if v is not None}


def reviews_task(folder: Path | str, **changes):
    return parse_custom_tasks({"reviews": declare(folder, **changes)})


# --- declarations: the package and the config schema refuse the same mistakes ----------------
BAD_DECLARATIONS = {
    "unknown key": ({"lable_field": "label"}, "unknown key 'lable_field'", "lable_field"),
    "missing label field": ({"label_field": None}, "label_field is missing", "label_field"),
    "three text fields": ({"text_fields": ["a", "b", "c"]}, "one field, or two", "too long"),
    "unknown metric": ({"metric": "acuracy"}, "unknown metric 'acuracy'", "acuracy"),
    "labels and regression": ({"regression": True}, "labels and regression both given",
                              "labels and regression exclude each other"),
    "neither labels nor regression": ({"labels": None}, "labels is missing",
                                      "needs labels"),
    "one label": ({"labels": ["0"]}, "needs two or more", "too short"),
    "duplicate labels": ({"labels": [0, "0"]}, "repeats '0'", None),
    "no data": ({"data": None}, "data is missing", "'data' is a required property"),
    "text fields on an image task": ({"kind": "image"}, "is for text tasks",
                                     "an image task takes no text_fields"),
}


@pytest.mark.parametrize("case", BAD_DECLARATIONS, ids=list(BAD_DECLARATIONS))
def test_bad_declarations_fail_in_package_and_schema(case):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    change, package_message, schema_message = BAD_DECLARATIONS[case]
    declaration = declare("data/raw/reviews", **change)
    with pytest.raises(TaskError, match=re.escape(package_message)) as err:
        parse_custom_tasks({"reviews": declaration})
    assert "custom task 'reviews'" in str(err.value)
    config = {"model": "minilm", "tasks": ["reviews"], "custom_tasks": {"reviews": declaration}}
    if schema_message is None:  # 0 and "0" differ as JSON; only the package sees them as one
        validate(copy.deepcopy(config), str(SCHEMA))
        return
    with pytest.raises(WorkflowError, match=re.escape(schema_message)):
        validate(config, str(SCHEMA))


def test_good_declaration_passes_both_and_metric_must_fit_the_task():
    from snakemake.utils import validate

    regression = declare("d", labels=None, regression=True, metric="pearson_spearman")
    config = {"model": "m", "tasks": ["reviews", "scores"],
              "custom_tasks": {"reviews": declare("d"), "scores": regression}}
    validate(config, str(SCHEMA))
    tasks = parse_custom_tasks(config["custom_tasks"])
    assert tasks["scores"].num_labels == 1 and tasks["reviews"].num_labels == 2
    assert get_task("scores", tasks).metric_name == "pearson_spearman"
    with pytest.raises(TaskError, match="does not score a classification"):
        reviews_task("d", metric="spearman")
    with pytest.raises(TaskError, match="does not score a regression"):
        parse_custom_tasks({"s": {**regression, "metric": "accuracy"}})
    with pytest.raises(TaskError, match="use macro_f1"):
        reviews_task("d", labels=["a", "b", "c"], metric="f1")
    with pytest.raises(TaskError, match="built-in task"):
        parse_custom_tasks({"rte": declare("d")})


def test_unknown_task_names_list_builtin_and_declared_tasks():
    declared = reviews_task("d")
    check_task_names(["cola", "reviews", "vtab-cifar"], declared)
    with pytest.raises(TaskError) as err:
        check_task_names(["cola", "reveiws", "qnli"], declared)
    message = str(err.value)
    assert "'reveiws', 'qnli'" in message and "declared tasks: reviews" in message
    assert "cola" in message and "vtab-cifar" in message


# --- labels and data formats ------------------------------------------------------------------
def test_labels_compare_as_text():
    assert {label_text(v) for v in (0, "0", 0.0, np.int64(0), " 0 ")} == {"0"}
    assert (label_text(True), label_text(False), label_text(2.5)) == ("true", "false", "2.5")
    assert label_text(None) is None and label_text(float("nan")) is None


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("labels", [["0", "1"], [0, 1]], ids=["string-labels", "int-labels"])
def test_every_format_gives_the_same_examples(tmp_path, suffix, labels):
    from bayestune.tasks import custom_text

    write_reviews(tmp_path / "data", suffix=suffix, val=6)
    task = reviews_task(tmp_path / "data", labels=labels)["reviews"]
    examples = custom_text.read_examples(task, custom_text.open_source(task))
    rows = review_rows(40, seed=0)
    assert [e.texts for e in examples["train"]] == [(r["text"],) for r in rows]
    assert [e.label for e in examples["train"]] == [r["label"] for r in rows]
    assert [len(examples[s]) for s in ("train", "val", "test")] == [40, 6, 12]
    line = {".parquet": " row 3"}.get(suffix, ":4" if suffix in (".csv", ".tsv") else ":3")
    assert examples["train"][2].where.endswith(f"train{suffix}{line}")


def test_label_errors_name_file_and_line(tmp_path):
    folder = tmp_path / "data"
    write_reviews(folder, n_train=4)
    # a quoted text over two lines and a blank line: the bad label is on line 7 of the file
    (folder / "train.csv").write_text(
        'text,label\n"Two\nlines",1\nfine,0\n\nalso fine,1\nbad one,positive\n')
    task = reviews_task(folder)
    with pytest.raises(TaskError, match=re.escape(f"{folder / 'train.csv'}:7: label 'positive'")):
        prepare_task("reviews", "minilm", tmp_path / "prep", custom_tasks=task)
    (folder / "train.csv").write_bytes(b"text,label\nok,1\ncaf\xe9,0\n")
    with pytest.raises(TaskError, match=re.escape(f"{folder / 'train.csv'}:3: not UTF-8")):
        prepare_task("reviews", "minilm", tmp_path / "prep", custom_tasks=task)
    (folder / "train.csv").unlink()
    write_split(folder, "train", [{"text": "a", "label": 1}, {"text": "b"}], ".jsonl")
    with pytest.raises(TaskError, match=re.escape(f"{folder / 'train.jsonl'}:2: no label")):
        prepare_task("reviews", "minilm", tmp_path / "prep", custom_tasks=task)
    (folder / "train.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(TaskError, match=re.escape(f"{folder / 'train.jsonl'}:2: malformed JSON")):
        prepare_task("reviews", "minilm", tmp_path / "prep", custom_tasks=task)
    write_split(folder, "train", review_rows(4), ".csv")
    with pytest.raises(TaskError, match="train.jsonl and train.csv both hold split 'train'"):
        prepare_task("reviews", "minilm", tmp_path / "prep", custom_tasks=task)
    (folder / "train.jsonl").unlink()
    with pytest.raises(TaskError, match=r"no field 'body' \(task 'reviews' reads body, label"):
        prepare_task("reviews", "minilm", tmp_path / "prep",
                     custom_tasks=reviews_task(folder, text_fields=["body"]))


def test_missing_val_is_a_seeded_cut_and_splits_rename(tmp_path):
    from bayestune.tasks import custom_text

    folder = write_reviews(tmp_path / "data")
    task = reviews_task(folder)["reviews"]
    examples = custom_text.read_examples(task, custom_text.open_source(task))
    train, val = split_train_val(review_rows(40, seed=0))
    assert [e.texts[0] for e in examples["val"]] == [r["text"] for r in val]
    assert [e.texts[0] for e in examples["train"]] == [r["text"] for r in train]
    assert (len(train), len(val)) == (36, 4)
    (folder / "test.csv").rename(folder / "dev.csv")
    with pytest.raises(TaskError, match="no test split; expected test"):
        custom_text.open_source(task)
    renamed = reviews_task(folder, splits={"test": "dev"})["reviews"]
    assert len(custom_text.read_examples(renamed, custom_text.open_source(renamed))["test"]) == 12
    with pytest.raises(TaskError, match="data folder .* does not exist"):
        custom_text.open_source(reviews_task(tmp_path / "missing")["reviews"])


# --- the token cache's key: source, raw data, declaration -------------------------------------
def test_prepare_retokenises_after_one_line_of_a_split_changes(tmp_path):
    folder = write_reviews(tmp_path / "data")
    task = reviews_task(folder)
    out = prepare_task("reviews", "minilm", tmp_path / "prep", custom_tasks=task, max_length=32)
    before, meta = load_token_cache(out / tokens.CACHE_FILE)
    assert meta["declaration"] == task["reviews"].declaration() and len(meta["data_hash"]) == 64
    lines = (folder / "test.csv").read_text().splitlines()
    lines[1] = lines[1].rsplit(",", 1)[0] + ",1" if lines[1].endswith(",0") else \
        lines[1].rsplit(",", 1)[0] + ",0"
    (folder / "test.csv").write_text("\n".join(lines) + "\n")
    prepare_task("reviews", "minilm", out, custom_tasks=task, max_length=32)
    after, _ = load_token_cache(out / tokens.CACHE_FILE)
    assert after["test"]["labels"][0] != before["test"]["labels"][0]
    assert torch.equal(after["test"]["labels"][1:], before["test"]["labels"][1:])


def test_builtin_prepare_retokenises_after_a_split_file_changes(tmp_path, glue_dir):
    """The GLUE cache was keyed on task, tokenizer and max length only: an edited data folder
    was reported up to date and served stale."""
    local = tmp_path / "glue"
    shutil.copytree(glue_dir / "cb", local / "cb")
    out = glue_tasks.prepare("cb", "minilm", tmp_path / "prep", local, max_length=32)
    before, meta = load_token_cache(out / tokens.CACHE_FILE)
    assert meta["source"] == str(local.resolve())
    path = local / "cb" / "test.jsonl"
    rows = path.read_text().splitlines()
    first = json.loads(rows[0])
    first["label"] = "neutral" if first["label"] != "neutral" else "contradiction"
    path.write_text("\n".join([json.dumps(first), *rows[1:]]) + "\n")
    glue_tasks.prepare("cb", "minilm", out, local, max_length=32)
    after, _ = load_token_cache(out / tokens.CACHE_FILE)
    assert after["test"]["labels"][0] != before["test"]["labels"][0]


def test_an_edited_declaration_prepares_again_and_stale_data_is_refused(tmp_path):
    folder = write_reviews(tmp_path / "data")
    out = prepare_task("reviews", "minilm", tmp_path / "prep", custom_tasks=reviews_task(folder),
                       max_length=32)
    flipped = reviews_task(folder, labels=["1", "0"])
    with pytest.raises(TaskError, match="prepared for another declaration"):
        load_task_data("reviews", out, 8, 0, custom_tasks=flipped)
    prepare_task("reviews", "minilm", out, custom_tasks=flipped, max_length=32)
    data = load_task_data("reviews", out, 8, 0, custom_tasks=flipped)
    labels = torch.cat([b["labels"] for b in data.test])
    assert labels.tolist() == [1 - r["label"] for r in review_rows(12, seed=1)]


def test_regression_task_from_jsonl(tmp_path):
    rows = [{"a": f"s {i}", "b": f"t {i}", "score": i / 4} for i in range(20)]
    folder = tmp_path / "data"
    for split in ("train", "test"):
        write_split(folder, split, rows, ".jsonl")
    task = parse_custom_tasks({"sim": {"data": str(folder), "text_fields": ["a", "b"],
                                       "label_field": "score", "regression": True,
                                       "metric": "pearson"}})
    out = prepare_task("sim", "minilm", tmp_path / "prep", custom_tasks=task, max_length=16)
    data = load_task_data("sim", out, 4, 0, custom_tasks=task)
    batch = next(iter(data.test))
    assert batch["labels"].dtype == torch.float32 and batch["labels"][:3].tolist() == [0, .25, .5]
    assert "token_type_ids" in batch and batch["token_type_ids"].max() == 1  # a pair
    model = build_task_model("sim", "minilm", 0, task)
    assert model.head_kind == "regression" and model.head.out_proj.out_features == 1


# --- images -----------------------------------------------------------------------------------
def _digit_folders(root: Path, per_class: dict[str, int], classes=(0, 1, 2)) -> Path:
    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    start = 0
    for split, n in per_class.items():
        for c in classes:
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(digits.target == c)[start:start + n]:
                Image.fromarray(images[i]).convert("RGB").save(root / split / str(c) / f"{i}.png")
        start += n
    return root


def test_image_class_folders_and_list_files(tmp_path):
    root = _digit_folders(tmp_path / "digits", {"train": 6, "test": 2})
    declared = parse_custom_tasks({"digits": {"data": str(root), "metric": "macro_f1"}})
    assert declared["digits"].kind == "image"
    out = prepare_task("digits", TINY_VIT, tmp_path / "prep", custom_tasks=declared)
    data = load_task_data("digits", out, 4, 0, custom_tasks=declared)
    assert [len(data.train.dataset), len(data.val.dataset), len(data.test.dataset)] == [16, 2, 6]
    batch = next(iter(data.test))
    assert batch["pixel_values"].shape == (6, 3, 32, 32)
    model = build_task_model("digits", TINY_VIT, 0, declared)
    assert model.head.out_features == 3
    (root / "test" / "7").mkdir()
    with pytest.raises(TaskError, match="class folder '7' is not one of the labels"):
        prepare_task("digits", TINY_VIT, tmp_path / "prep", custom_tasks=declared)
    (root / "test" / "7").rmdir()
    # the same images as VTAB list files: class numbers into the declared labels
    for split in ("train", "test"):
        lines = [f"{split}/{c}/{p.name} {c}" for c in (0, 1, 2)
                 for p in sorted((root / split / str(c)).iterdir())]
        (root / f"{split}800.txt").write_text("\n".join(lines) + "\n")
    lists = {"data": str(root), "metric": "accuracy", "splits": {"train": "train800",
                                                                 "test": "test800"}}
    with pytest.raises(TaskError, match="list files hold class numbers; declare labels"):
        prepare_task("digits", TINY_VIT, tmp_path / "p2",
                     custom_tasks=parse_custom_tasks({"digits": lists}))
    listed = parse_custom_tasks({"digits": {**lists, "labels": ["zero", "one", "two"]}})
    out = prepare_task("digits", TINY_VIT, tmp_path / "p2", custom_tasks=listed)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == "lists" and manifest["labels"] == ["zero", "one", "two"]
    assert sorted(manifest["splits"]["test"]["labels"]) == [0, 0, 1, 1, 2, 2]


# --- the command line -------------------------------------------------------------------------
def test_cli_task_file_and_its_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_reviews(tmp_path / "data/raw/reviews")
    task_file = tmp_path / "run.yaml"
    task_file.write_text(yaml.safe_dump({"model": "minilm", "tasks": ["reviews"],
                                         "custom_tasks": {"reviews": declare("data/raw/reviews")}}))
    assert set(read_task_file(task_file)) == {"reviews"}
    base = ["prepare", "--model", "minilm", "--out-dir", "prep", "--max-length", "32"]
    assert main([*base, "--task", "reviews", "--task-file", str(task_file)]) == 0
    assert main([*base, "--task", "reviews"]) == 2
    assert "unknown task 'reviews'" in capsys.readouterr().err
    assert main([*base, "--task", "reveiws", "--task-file", str(task_file)]) == 2
    assert "declared tasks: reviews" in capsys.readouterr().err
    assert main([*base, "--task", "reviews", "--task-file", str(task_file),
                 "--data-dir", "elsewhere"]) == 2
    assert "drop --data-dir" in capsys.readouterr().err
    (tmp_path / "plain.yaml").write_text("model: minilm\n")
    assert main([*base, "--task", "reviews", "--task-file", "plain.yaml"]) == 2
    assert "no top-level custom_tasks" in capsys.readouterr().err
