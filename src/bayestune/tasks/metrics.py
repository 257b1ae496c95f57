"""Task metrics by name: logits and labels as numpy arrays in, a score in natural units out.

Classification metrics take the class logits (the prediction is their argmax); regression
metrics take the predicted values. Tables multiply the scores by 100.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# scipy.stats and sklearn.metrics are imported where a score is computed: together they cost
# about 3 s, which every job and every Snakemake start (through the task registry) would pay.

Metric = Callable[[np.ndarray, np.ndarray], float]


def _predictions(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits).argmax(axis=-1)


def _classes(logits: np.ndarray) -> list[int]:
    # Every class the head can predict, so macro-F1 counts a class missing from a small split.
    return list(range(np.asarray(logits).shape[-1]))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, _predictions(logits)))


def f1(logits: np.ndarray, labels: np.ndarray) -> float:
    """F1 of class 1 (two classes)."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, _predictions(logits), zero_division=0))


def macro_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, _predictions(logits), labels=_classes(logits),
                          average="macro", zero_division=0))


def matthews(logits: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, _predictions(logits)))


def acc_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    return (accuracy(logits, labels) + f1(logits, labels)) / 2


def acc_macro_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    return (accuracy(logits, labels) + macro_f1(logits, labels)) / 2


def _values(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    preds = np.asarray(logits, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    if np.ptp(preds) == 0 or np.ptp(labels) == 0:
        return None  # correlation is undefined for a constant; scored as none, not NaN
    return preds, labels


def pearson(logits: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import pearsonr

    pair = _values(logits, labels)
    return 0.0 if pair is None else float(pearsonr(*pair)[0])


def spearman(logits: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import spearmanr

    pair = _values(logits, labels)
    return 0.0 if pair is None else float(spearmanr(*pair)[0])


def pearson_spearman(logits: np.ndarray, labels: np.ndarray) -> float:
    return (pearson(logits, labels) + spearman(logits, labels)) / 2


METRICS: dict[str, Metric] = {
    "accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews": matthews,
    "acc_f1": acc_f1, "acc_macro_f1": acc_macro_f1,
    "pearson": pearson, "spearman": spearman, "pearson_spearman": pearson_spearman,
}
REGRESSION_METRICS = frozenset({"pearson", "spearman", "pearson_spearman"})
TWO_CLASS_METRICS = frozenset({"f1", "acc_f1"})  # F1 of class 1: needs exactly two classes
