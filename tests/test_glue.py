"""GLUE/SuperGLUE tasks on the real files: rows, metrics, bad input, hub split, token cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bayestune.files import load_token_cache
from bayestune.models.text import load_tokenizer
from bayestune.tasks import glue, tokens
from bayestune.tasks.base import TaskError

SEVEN = ("cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc")


def count_rows(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def test_registry_has_the_seven_tasks():
    assert tuple(glue.TASKS) == SEVEN
    assert all(spec.benchmark == "glue" and spec.name == name for name, spec in glue.TASKS.items())
    assert {t: glue.FORMATS[t].head for t in ("stsb", "copa", "wsc")} == {
        "stsb": "regression", "copa": "copa", "wsc": "wsc"}
    assert glue.FORMATS["cb"].num_labels == 3 and glue.FORMATS["stsb"].num_labels == 1


@pytest.mark.parametrize("task", SEVEN)
def test_local_rows_match_the_files(glue_dir, task):
    splits = glue.read_splits(task, glue_dir)
    for split in glue.SPLITS:
        assert len(splits[split]) == count_rows(glue_dir / task / f"{split}.jsonl") > 0
    labels = {e["label"] for e in splits["train"]}
    if task == "stsb":
        assert min(labels) >= 0 and max(labels) <= 5 and len(labels) > 10
    else:
        assert labels == set(range(glue.FORMATS[task].num_labels))


def test_readme_row_counts(glue_dir):
    expected = {"cola": (7695, 856, 1043), "stsb": (5166, 583, 1500), "cb": (225, 25, 56),
                "wsc": (495, 59, 104)}
    for task, rows in expected.items():
        assert tuple(count_rows(glue_dir / task / f"{s}.jsonl") for s in glue.SPLITS) == rows


def test_metrics_against_hand_computed_values():
    two = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # predicts 1, 0, 0, 0
    labels = np.array([1, 1, 0, 0])
    # TP=1 TN=2 FP=0 FN=1: MCC = 2 / sqrt(1*2*2*3); F1 = 2/3; accuracy 3/4
    assert glue.TASKS["cola"].metric(two, labels) == pytest.approx(2 / np.sqrt(12))
    assert glue.TASKS["mrpc"].metric(two, labels) == pytest.approx((0.75 + 2 / 3) / 2)
    assert glue.TASKS["rte"].metric(two, labels) == pytest.approx(0.75)
    assert glue.TASKS["copa"].metric(two, labels) == pytest.approx(0.75)
    three = np.eye(3)[[0, 1, 2, 0]]
    # per-class F1: 2/3, 1, 2/3 -> macro 7/9; accuracy 3/4
    assert glue.TASKS["cb"].metric(three, np.array([0, 1, 2, 2])) == pytest.approx(
        (0.75 + 7 / 9) / 2)
    # Spearman 1; Pearson 14 / sqrt(5 * 50)
    stsb = glue.TASKS["stsb"].metric(np.array([1.0, 2, 3, 4]), np.array([1.0, 2, 3, 10]))
    assert stsb == pytest.approx((1 + 14 / np.sqrt(250)) / 2)
    assert glue.TASKS["stsb"].metric(np.ones((4, 1)), np.array([1.0, 2, 3, 10])) == 0.0


# --- bad input --------------------------------------------------------------------------------
def write_task(root: Path, task: str, rows: dict[str, list]) -> Path:
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        text = "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines)
        (folder / f"{split}.jsonl").write_text(text)
    return root


def good(task: str, glue_dir: Path, n: int = 2) -> list[dict]:
    lines = (glue_dir / task / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def three_splits(rows: list) -> dict[str, list]:
    return {"train": rows, "val": rows, "test": rows}


def test_unknown_task():
    with pytest.raises(TaskError, match="unknown GLUE/SuperGLUE task 'qnli'"):
        glue.read_splits("qnli", "/nonexistent")


def test_missing_split_file(tmp_path, glue_dir):
    write_task(tmp_path, "rte", {"train": good("rte", glue_dir), "val": good("rte", glue_dir)})
    with pytest.raises(TaskError, match=re.escape(str(tmp_path / "rte" / "test.jsonl"))):
        glue.read_splits("rte", tmp_path)


def test_malformed_json_names_file_and_line(tmp_path, glue_dir):
    rows = good("cola", glue_dir) + ['{"text": "broken", "label": \n']
    write_task(tmp_path, "cola", three_splits(rows))
    path = tmp_path / "cola" / "train.jsonl"
    with pytest.raises(TaskError, match=re.escape(f"{path}:3: malformed JSON")):
        glue.read_splits("cola", tmp_path)


@pytest.mark.parametrize(("task", "label"), [("rte", "maybe"), ("cola", 1), ("copa", True),
                                             ("cb", "Entailment"), ("wsc", "true"), ("stsb", 5.5)])
def test_label_outside_the_label_set(tmp_path, glue_dir, task, label):
    rows = good(task, glue_dir)
    rows[1]["label"] = label
    write_task(tmp_path, task, three_splits(rows))
    with pytest.raises(TaskError, match=re.escape(f"train.jsonl:2: label {label!r}")):
        glue.read_splits(task, tmp_path)


def test_empty_split(tmp_path, glue_dir):
    write_task(tmp_path, "cb", {"train": good("cb", glue_dir), "val": ["\n"],
                                "test": good("cb", glue_dir)})
    with pytest.raises(TaskError, match="val.jsonl: empty split"):
        glue.read_splits("cb", tmp_path)


@pytest.mark.parametrize(("task", "field"), [("mrpc", "text_b"), ("copa", "question"),
                                             ("wsc", "target"), ("stsb", "label")])
def test_missing_field(tmp_path, glue_dir, task, field):
    rows = good(task, glue_dir)
    del rows[0][field]
    write_task(tmp_path, task, three_splits(rows))
    with pytest.raises(TaskError, match=re.escape(f"train.jsonl:1: missing field '{field}'")):
        glue.read_splits(task, tmp_path)


def test_wsc_span_that_does_not_match_the_text(tmp_path, glue_dir):
    rows = good("wsc", glue_dir)
    rows[0]["target"]["span1_text"] = "refrigerator"
    write_task(tmp_path, "wsc", three_splits(rows))
    with pytest.raises(TaskError, match=r"train.jsonl:1: span1_text 'refrigerator' does not match"):
        glue.read_splits("wsc", tmp_path)


def test_copa_question_must_be_cause_or_effect(tmp_path, glue_dir):
    rows = good("copa", glue_dir)
    rows[0]["question"] = "why"
    write_task(tmp_path, "copa", three_splits(rows))
    with pytest.raises(TaskError, match="train.jsonl:1: question 'why'"):
        glue.read_splits("copa", tmp_path)


# --- sources ----------------------------------------------------------------------------------
def test_source_precedence(tmp_path, monkeypatch, glue_dir):
    monkeypatch.setenv(glue.ENV_DIR, str(glue_dir))
    assert glue.resolve_source(tmp_path) == tmp_path          # argument beats env
    assert glue.resolve_source(None) == glue_dir              # then env
    assert glue.resolve_source("hub") == glue.HUB             # "hub" forces the Hub
    monkeypatch.delenv(glue.ENV_DIR)
    assert glue.resolve_source(None) == glue.HUB              # nothing given: the Hub
    with pytest.raises(TaskError, match="BAYESTUNE_GLUE_DIR"):
        glue.resolve_source(tmp_path / "missing")


def test_split_train_val_is_a_seeded_90_10_cut():
    rows = list(range(101))
    train, val = glue.split_train_val(rows, seed=0)
    assert (len(train), len(val)) == (90, 11)
    assert sorted(train + val) == rows and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)   # source order kept inside each part
    assert glue.split_train_val(rows, seed=0) == (train, val)
    assert glue.split_train_val(rows, seed=1)[1] != val


def test_hub_source_uses_the_same_split_rule(monkeypatch):
    import datasets

    def fake_load(name, config, split):
        assert (name, config) == glue.FORMATS["rte"].hub
        n = 40 if split == "train" else 6
        return datasets.Dataset.from_dict({
            "sentence1": [f"premise {split} {i}" for i in range(n)],
            "sentence2": [f"hypothesis {i}" for i in range(n)],
            "label": [i % 2 for i in range(n)], "idx": list(range(n))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    splits = glue.read_splits("rte", "hub")
    assert [len(splits[s]) for s in glue.SPLITS] == [36, 4, 6]
    val_ids = [int(e["premise"].split()[-1]) for e in splits["val"]]
    assert val_ids == glue.split_train_val(list(range(40)), glue.HUB_SPLIT_SEED)[1]
    assert all(e["label"] == int(e["premise"].split()[-1]) % 2 for e in splits["train"])
    assert splits["test"][0]["premise"] == "premise validation 0"


def test_hub_offline_error_names_the_local_option(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv(glue.ENV_DIR, raising=False)
    with pytest.raises(TaskError) as err:
        glue.read_splits("cola", None)
    for hint in ("glue_dir", "BAYESTUNE_GLUE_DIR", "--data-dir"):
        assert hint in str(err.value)


# --- WSC spans --------------------------------------------------------------------------------
def test_locate_span_tolerates_known_quirks():
    text = "Emma's mother said it was hers , and she kept it ."
    assert glue.locate_span(text, 0, "Emma") == (0, 4)            # possessive
    assert text[slice(*glue.locate_span(text, 3, "it"))] == "it"  # exact
    assert text[slice(*glue.locate_span(text, 9, "it"))] == "it"  # off by one (word 10)
    assert glue.locate_span(text, 5, "kept") is None              # four words away: no match


@pytest.mark.parametrize("split", glue.SPLITS)
def test_wsc_span_masks_cover_the_span_words(glue_dir, tokenizer, split):
    examples = glue.read_split_file("wsc", glue_dir / "wsc" / f"{split}.jsonl")
    tensors = glue.tokenize_examples("wsc", examples, tokenizer, max_length=128,
                                     architecture="first-token")
    for i, example in enumerate(examples):
        for k in ("span1", "span2"):
            start, end = example[k]
            tokens = tensors["input_ids"][i][tensors[f"{k}_mask"][i]]
            decoded = tokenizer.decode(tokens).replace(" ", "")
            assert decoded == example["text"][start:end].lower().replace(" ", ""), example["where"]


def jiant_span_positions(tokenizer, text: str, word_index: int, span_text: str) -> list[int]:
    """jiant's rule, computed the way its TokenAligner does it for a WordPiece tokenizer: the
    span's words are text.split()[word_index : word_index + len(span_text.split())], every
    sub-word token of each word is in the span, and position 0 is [CLS] (cls_offset 1)."""
    words = text.split()
    before = sum(len(tokenizer.tokenize(w)) for w in words[:word_index])
    inside = sum(len(tokenizer.tokenize(w))
                 for w in words[word_index:word_index + len(span_text.split())])
    return list(range(1 + before, 1 + before + inside))


@pytest.mark.parametrize("split", glue.SPLITS)
def test_wsc_jiant_spans_are_jiants_token_positions(glue_dir, tokenizer, split):
    path = glue_dir / "wsc" / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    examples = glue.read_split_file("wsc", path)
    tensors = glue.tokenize_examples("wsc", examples, tokenizer, max_length=128,
                                     architecture="jiant")
    for i, row in enumerate(rows):
        for k in ("1", "2"):
            want = jiant_span_positions(tokenizer, row["text"], row["target"][f"span{k}_index"],
                                        row["target"][f"span{k}_text"])
            got = torch.nonzero(tensors[f"span{k}_mask"][i]).squeeze(1).tolist()
            assert got == want, (examples[i]["where"], k)


def test_wsc_jiant_span_of_a_possessive_takes_the_whole_word(glue_dir, tokenizer):
    """train.jsonl line 47: span1 "Emma" at word 0, which is "Emma's". jiant takes every token
    of the word (emma ' s: positions 1-3); first-token took the located text "Emma" (1)."""
    examples = glue.read_split_file("wsc", glue_dir / "wsc" / "train.jsonl")
    example = examples[46]
    assert example["text"].startswith("Emma's mother had died long ago")
    jiant = glue.tokenize_examples("wsc", [example], tokenizer, 128, architecture="jiant")
    first = glue.tokenize_examples("wsc", [example], tokenizer, 128, architecture="first-token")
    assert torch.nonzero(jiant["span1_mask"][0]).squeeze(1).tolist() == [1, 2, 3]
    assert tokenizer.decode(jiant["input_ids"][0][1:4]) == "emma ' s"
    assert torch.nonzero(first["span1_mask"][0]).squeeze(1).tolist() == [1]
    assert torch.equal(jiant["input_ids"], first["input_ids"])  # the text itself is the same


# --- token cache and loaders ------------------------------------------------------------------
def test_prepare_caches_and_load_data_serves_batches(tmp_path, glue_dir, monkeypatch):
    out = glue.prepare("cb", "minilm", tmp_path / "cb", glue_dir, max_length=64)
    splits, meta = load_token_cache(out / glue.CACHE_FILE)
    assert meta["rows"] == {"train": 225, "val": 25, "test": 56}
    assert (meta["task"], meta["tokenizer"], meta["max_length"]) == (
        "cb", "sentence-transformers/all-MiniLM-L6-v2", 64)
    assert splits["train"]["input_ids"].shape[1] <= 64

    def no_tokenizer(name):
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(tokens, "tokenizer_for", no_tokenizer)
    glue.prepare("cb", "all-MiniLM-L6-v2", tmp_path / "cb", glue_dir, max_length=64)  # alias hit
    with pytest.raises(AssertionError, match="cache hit"):
        glue.prepare("cb", "minilm", tmp_path / "cb", glue_dir, max_length=32)

    data = glue.load_data("cb", out, batch_size=8, seed=3, eval_batch_size=16)
    batch = next(iter(data.train_epoch(0)))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[0] == 8
    assert batch["attention_mask"][:, -1].any(), "padding is trimmed to the batch's longest row"
    again = next(iter(data.train_epoch(0)))
    assert torch.equal(batch["input_ids"], again["input_ids"])
    other = next(iter(data.train_epoch(1)))
    assert not torch.equal(batch["labels"], other["labels"]) or not torch.equal(
        batch["input_ids"], other["input_ids"])
    test_labels = torch.cat([b["labels"] for b in data.test])
    assert torch.equal(test_labels, splits["test"]["labels"])   # test in file order
    with pytest.raises(TaskError, match="token cache of task 'cb'"):
        glue.load_data("rte", out, batch_size=8, seed=0)
    with pytest.raises(TaskError, match="run `bayestune prepare"):
        glue.load_data("cb", tmp_path / "nothing", batch_size=8, seed=0)


@pytest.mark.parametrize("architecture", ["jiant", "first-token"])
def test_copa_batches_hold_both_choices(glue_dir, tokenizer, architecture):
    examples = glue.read_split_file("copa", glue_dir / "copa" / "val.jsonl")
    tensors = glue.tokenize_examples("copa", examples, tokenizer, max_length=128,
                                     architecture=architecture)
    assert tensors["input_ids"].shape[:2] == (len(examples), 2)
    first = tokenizer.decode(tensors["input_ids"][0, 1], skip_special_tokens=True)
    question = glue.COPA_QUESTIONS[architecture][examples[0]["question"]].lower()
    assert question in first and examples[0]["choice2"].lower().rstrip(".") in first


def test_copa_jiant_input_is_jiants_pair(glue_dir, tokenizer):
    """val.jsonl line 1, as jiant's copa.py builds it: (premise + " " + question, choice), the
    question "What was the cause of this?" for a cause, one pair per choice."""
    examples = glue.read_split_file("copa", glue_dir / "copa" / "val.jsonl")
    assert (examples[0]["premise"], examples[0]["question"]) == (
        "The family postponed the barbeque.", "cause")
    tensors = glue.tokenize_examples("copa", examples[:1], tokenizer, 128, architecture="jiant")
    assert [tokenizer.decode(tensors["input_ids"][0, c]) for c in (0, 1)] == [
        "[CLS] the family postponed the barbeque. what was the cause of this? [SEP] "
        "the forecast called for storms. [SEP]",
        "[CLS] the family postponed the barbeque. what was the cause of this? [SEP] "
        "it was a holiday weekend. [SEP]"]
    # the choice is the second segment, as jiant's BERT featurisation gives it
    segments = tensors["token_type_ids"][0, 0][tensors["attention_mask"][0, 0].bool()]
    assert segments.tolist() == [0] * 17 + [1] * 7
    assert glue.COPA_QUESTIONS["jiant"] == {"cause": "What was the cause of this?",
                                            "effect": "What happened as a result?"}


def test_token_cache_is_keyed_by_architecture(tmp_path, glue_dir, monkeypatch):
    """COPA's question differs per architecture: each has its own cache, an old cache (no
    architecture recorded) is tokenised again, and a cache of the other one is refused."""
    out = glue.prepare("copa", "minilm", tmp_path / "copa", glue_dir, 64, architecture="jiant")
    _, meta = load_token_cache(out / glue.CACHE_FILE)
    assert meta["architecture"] == "jiant"
    glue.load_data("copa", out, 8, 0, architecture="jiant")
    with pytest.raises(TaskError, match="tokenised for architecture 'jiant'.*--architecture "
                                        "first-token"):
        glue.load_data("copa", out, 8, 0, architecture="first-token")
    glue.prepare("copa", "minilm", out, glue_dir, 64, architecture="first-token")
    _, meta = load_token_cache(out / glue.CACHE_FILE)
    assert meta["architecture"] == "first-token"
    # a cache written before the key existed: re-tokenised for jiant, served as first-token
    splits, meta = load_token_cache(out / glue.CACHE_FILE)
    del meta["architecture"]
    tokens.write_cache(out, splits, meta, meta.pop("rows"))
    glue.load_data("copa", out, 8, 0, architecture="first-token")
    with pytest.raises(TaskError, match="'first-token'"):
        glue.load_data("copa", out, 8, 0, architecture="jiant")
    calls = []
    real = tokens.tokenizer_for
    monkeypatch.setattr(tokens, "tokenizer_for", lambda name: calls.append(name) or real(name))
    glue.prepare("copa", "minilm", out, glue_dir, 64, architecture="jiant")
    assert calls == ["minilm"]


def test_build_model_picks_each_task_head(monkeypatch):
    calls = {}
    monkeypatch.setattr(glue, "build_text_model",
                        lambda name, head, num_labels, seed, architecture: calls.setdefault(
                            head + str(num_labels), (name, seed, architecture)))
    for task in SEVEN:
        glue.build_model(task, "minilm", 5)
    assert set(calls) == {"classification2", "classification3", "regression1", "copa2", "wsc2"}
    assert set(calls.values()) == {("minilm", 5, "jiant")}


def test_dispatch_finds_the_glue_tasks():
    from bayestune.tasks import get_task

    assert get_task("copa") is glue.TASKS["copa"]
