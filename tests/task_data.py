"""Small data folders and tiny models that several test files build in temporary folders.

Nothing here copies the shared GLUE data: the review texts are generated, and the tiny
encoders are random weights of real architectures with MiniLM's tokenizer.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

GOOD = ["wonderful", "moving", "sharp", "funny", "gripping", "lovely"]
BAD = ["dull", "clumsy", "tedious", "flat", "confused", "lifeless"]
NOUNS = ["film", "plot", "cast", "ending", "score", "script"]

REVIEWS_DECLARATION = {"data": "", "text_fields": ["text"], "label_field": "label",
                       "labels": ["0", "1"], "metric": "accuracy"}


def review_rows(n: int, seed: int = 0, pair: bool = False) -> list[dict]:
    """``n`` labelled reviews (1 = positive), alternating labels; a comma in every text, so
    CSV writers must quote. With ``pair``, a second text field ``summary``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(GOOD if label else BAD)
        row = {"text": f"The {rng.choice(NOUNS)} was {word}, {rng.choice(['truly', 'so'])} "
                       f"{word} from start to end.", "label": label}
        if pair:
            row["summary"] = f"In short: {word}."
        rows.append(row)
    return rows


def write_split(folder: Path, split: str, rows: list[dict], suffix: str = ".csv") -> Path:
    """One split file in any supported format, written by pandas as a user's tools would."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def write_reviews(folder: Path, n_train: int = 40, n_test: int = 12, suffix: str = ".csv",
                  pair: bool = False, val: int = 0) -> Path:
    """train and test (and val when ``val`` > 0) review splits in ``folder``."""
    write_split(folder, "train", review_rows(n_train, seed=0, pair=pair), suffix)
    write_split(folder, "test", review_rows(n_test, seed=1, pair=pair), suffix)
    if val:
        write_split(folder, "val", review_rows(val, seed=2, pair=pair), suffix)
    return folder


def save_tiny_text_model(family: str, folder: Path) -> Path:
    """A random two-layer encoder of ``family`` with MiniLM's fast tokenizer, saved as a model
    folder that ``--model`` accepts. The vocabulary is MiniLM's (30522 tokens)."""
    from transformers import AutoModel, BertConfig, DebertaV2Config, DistilBertConfig, ElectraConfig

    from bayestune.models.text import load_tokenizer

    shape = {"vocab_size": 30522, "max_position_embeddings": 128}
    configs = {
        "bert": lambda: BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, **shape),
        "deberta-v2": lambda: DebertaV2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
            **shape),
        "electra": lambda: ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, **shape),
        "distilbert": lambda: DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                               **shape),
    }
    AutoModel.from_config(configs[family]()).save_pretrained(folder)
    load_tokenizer("minilm").save_pretrained(folder)
    return folder
