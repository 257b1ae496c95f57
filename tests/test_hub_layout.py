"""The Hugging Face Hub source, offline: local copies of nyu-mll/glue and aps/super_glue in
the Hub's own layout, read through the very `datasets.load_dataset(NAME, CONFIG, split=...)`
call the Hub source makes.

`load_dataset` reads a local folder when one exists at the dataset id (relative to the working
directory), with the same Parquet builder, dataset card and features as a download. The
folders here hold Parquet files per config and split with the Hub's column names, dtypes and
class-label names (the datasets' published schemas, written out below independently of the
package's conversion) and the card's `configs:` section. The rows come from the first lines of
the local JSONL files, so the Hub path must give back exactly the local path's examples: a
wrong column name or label order in the package fails here, not on a user's GPU box.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from datasets import ClassLabel, Dataset, Features, Value

from bayestune.files import load_token_cache
from bayestune.tasks import glue, tokens
from bayestune.tasks.base import split_train_val
from bayestune.tasks.custom import parse_custom_tasks

N_TRAIN, N_DEV = 30, 12   # first lines of local train.jsonl (Hub train), test.jsonl (Hub dev)
TEXT, INDEX = Value("string"), Value("int32")


def _labels(*names: str) -> ClassLabel:
    return ClassLabel(names=list(names))


# (repository, config, features in the Hub's column order, local row -> Hub row)
HUB = {
    "cola": ("nyu-mll/glue", "cola",
             Features({"sentence": TEXT, "label": _labels("unacceptable", "acceptable"),
                       "idx": INDEX}),
             lambda r: {"sentence": r["text"], "label": int(r["label"]), "idx": r["idx"]}),
    "stsb": ("nyu-mll/glue", "stsb",
             Features({"sentence1": TEXT, "sentence2": TEXT, "label": Value("float32"),
                       "idx": INDEX}),
             lambda r: {"sentence1": r["text_a"], "sentence2": r["text_b"], "label": r["label"],
                        "idx": r["idx"]}),
    "mrpc": ("nyu-mll/glue", "mrpc",
             Features({"sentence1": TEXT, "sentence2": TEXT,
                       "label": _labels("not_equivalent", "equivalent"), "idx": INDEX}),
             lambda r: {"sentence1": r["text_a"], "sentence2": r["text_b"],
                        "label": int(r["label"]), "idx": r["idx"]}),
    "rte": ("nyu-mll/glue", "rte",
            Features({"sentence1": TEXT, "sentence2": TEXT,
                      "label": _labels("entailment", "not_entailment"), "idx": INDEX}),
            lambda r: {"sentence1": r["premise"], "sentence2": r["hypothesis"],
                       "label": ["entailment", "not_entailment"].index(r["label"]),
                       "idx": r["idx"]}),
    "cb": ("aps/super_glue", "cb",
           Features({"premise": TEXT, "hypothesis": TEXT, "idx": INDEX,
                     "label": _labels("entailment", "contradiction", "neutral")}),
           lambda r: {"premise": r["premise"], "hypothesis": r["hypothesis"], "idx": r["idx"],
                      "label": ["entailment", "contradiction", "neutral"].index(r["label"])}),
    "copa": ("aps/super_glue", "copa",
             Features({"premise": TEXT, "choice1": TEXT, "choice2": TEXT, "question": TEXT,
                       "idx": INDEX, "label": _labels("choice1", "choice2")}),
             lambda r: {k: r[k] for k in ("premise", "choice1", "choice2", "question", "idx",
                                          "label")}),
    "wsc": ("aps/super_glue", "wsc.fixed",
            Features({"text": TEXT, "span1_index": INDEX, "span2_index": INDEX,
                      "span1_text": TEXT, "span2_text": TEXT, "idx": INDEX,
                      "label": _labels("False", "True")}),
            lambda r: {"text": r["text"], **r["target"], "idx": r["idx"],
                       "label": int(r["label"])}),
}
SEVEN = tuple(HUB)


def _local_lines(glue_dir: Path, task: str, split: str, n: int) -> list[dict]:
    lines = (glue_dir / task / f"{split}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def _write_config(repo: Path, config: str, features: Features, splits: dict[str, list]) -> None:
    for split, rows in splits.items():
        dataset = Dataset.from_list(rows, features=features)
        dataset.to_parquet(str(repo / config / f"{split}-00000-of-00001.parquet"))


def _write_card(repo: Path, configs: dict[str, Features]) -> None:
    card = {
        "configs": [{"config_name": name, "data_files": [
            {"split": split, "path": f"{name}/{split}-*"} for split in
            ("train", "validation", "test")]} for name in configs],
        "dataset_info": [{"config_name": name, "features": features._to_yaml_list()}
                         for name, features in configs.items()],
    }
    (repo / "README.md").write_text(f"---\n{yaml.safe_dump(card, sort_keys=False)}---\n")


@pytest.fixture(scope="module")
def hub_mirror(tmp_path_factory, glue_dir) -> Path:
    """A working directory where nyu-mll/glue and aps/super_glue resolve to local folders."""
    root = tmp_path_factory.mktemp("hub")
    cards: dict[str, dict[str, Features]] = {}
    for task, (repo, config, features, to_hub) in HUB.items():
        train = [to_hub(r) for r in _local_lines(glue_dir, task, "train", N_TRAIN)]
        dev = [to_hub(r) for r in _local_lines(glue_dir, task, "test", N_DEV)]
        # the official test labels are hidden: -1 for class labels, as on the Hub
        hidden = [{**r, "label": -1 if isinstance(features["label"], ClassLabel) else -1.0}
                  for r in dev[:3]]
        _write_config(root / repo, config, features,
                      {"train": train, "validation": dev, "test": hidden})
        cards.setdefault(repo, {})[config] = features
    for repo, configs in cards.items():
        _write_card(root / repo, configs)
    return root


@pytest.fixture
def offline_hub(hub_mirror, tmp_path, monkeypatch) -> Path:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.chdir(hub_mirror)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return hub_mirror


def _plain(examples: list[dict], task: str) -> list[dict]:
    """Examples without their origin; STS-B's float32 Hub labels compared as float32."""
    out = []
    for e in examples:
        e = {k: v for k, v in e.items() if k != "where"}
        if task == "stsb":
            e["label"] = float(np.float32(e["label"]))
        out.append(e)
    return out


def test_the_mirror_is_the_hub_layout(hub_mirror):
    card = (hub_mirror / "aps/super_glue/README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert [c["config_name"] for c in front["configs"]] == ["cb", "copa", "wsc.fixed"]
    assert (hub_mirror / "nyu-mll/glue/rte/validation-00000-of-00001.parquet").is_file()


@pytest.mark.parametrize("task", SEVEN)
def test_hub_rows_equal_local_rows(offline_hub, glue_dir, task):
    hub = glue.read_hub(task)  # datasets.load_dataset("nyu-mll/glue", "rte", split=...) etc.
    local_train = glue.read_split_file(task, glue_dir / task / "train.jsonl")[:N_TRAIN]
    local_test = glue.read_split_file(task, glue_dir / task / "test.jsonl")[:N_DEV]
    train, val = split_train_val(local_train, glue.HUB_SPLIT_SEED)
    assert _plain(hub["train"], task) == _plain(train, task)
    assert _plain(hub["val"], task) == _plain(val, task)
    assert _plain(hub["test"], task) == _plain(local_test, task)
    assert hub["test"][0]["where"] == f"hub {'/'.join(HUB[task][:2])} validation row 0"


def test_hub_prepare_matches_local_tokens_and_is_keyed_on_the_fingerprint(offline_hub, glue_dir,
                                                                          tmp_path):
    out = glue.prepare("rte", "minilm", tmp_path / "hub", "hub", max_length=48)
    splits, meta = load_token_cache(out / tokens.CACHE_FILE)
    assert meta["source"] == "hub:nyu-mll/glue/rte" and meta["data_hash"].startswith("train:")
    assert meta["rows"] == {"train": 27, "val": 3, "test": N_DEV}
    tokenizer = tokens.tokenizer_for("minilm")
    local = glue.read_split_file("rte", glue_dir / "rte" / "test.jsonl")[:N_DEV]
    expected = glue.tokenize_examples("rte", local, tokenizer, 48)
    for name, tensor in expected.items():
        assert splits["test"][name].tolist() == tensor.tolist(), name
    assert tokens.cache_is_current(out, {"data_hash": meta["data_hash"]})


def test_declared_task_reads_the_hub_with_class_names(offline_hub, glue_dir):
    """A custom task over a Hub dataset: class-label columns read as their names."""
    from bayestune.tasks import custom_text

    declared = parse_custom_tasks({"my-rte": {
        "data": "nyu-mll/glue", "subset": "rte", "text_fields": ["sentence1", "sentence2"],
        "label_field": "label", "labels": ["entailment", "not_entailment"],
        "metric": "accuracy", "splits": {"test": "validation"}}})["my-rte"]
    source = custom_text.open_source(declared)
    assert source.name == f"hub:{offline_hub / 'nyu-mll/glue'}/rte" and source.rows["val"] is None
    examples = custom_text.read_examples(declared, source)
    local = glue.read_split_file("rte", glue_dir / "rte" / "test.jsonl")[:N_DEV]
    assert [(e.texts, e.label) for e in examples["test"]] == [
        ((r["premise"], r["hypothesis"]), r["label"]) for r in local]
    assert (len(examples["train"]), len(examples["val"])) == (27, 3)
