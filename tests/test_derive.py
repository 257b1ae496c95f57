"""Smaller encoders cut from a pretrained one: the first k layers (the name minilm-l<k>) and
the vocabulary of a task's data (cut-vocabulary, config key model_vocabulary)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from shared_runs import REPO, copy_workflow, tiny_encoder
from test_workflow import job_counts, snakemake
from transformers import AutoModel, AutoTokenizer

from bayestune.cli import main
from bayestune.models.derive import DerivedModelError, keep_first_layers, restrict_vocabulary
from bayestune.models.text import resolve_model_path
from bayestune.tasks import used_token_ids


def test_minilm_l1_is_minilms_first_layer_with_its_embeddings_and_pooler(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("BAYESTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_path("minilm-l1")
    assert folder == str(tmp_path / "cache/minilm-l1")
    assert resolve_model_path("minilm-l1") == folder  # built once, then read
    cut = AutoModel.from_pretrained(folder).state_dict()
    full = AutoModel.from_pretrained(resolve_model_path("minilm")).state_dict()
    assert cut.keys() == {k for k in full if not k.startswith("encoder.layer.")
                          or k.startswith("encoder.layer.0.")}
    assert all(torch.equal(cut[k], full[k]) for k in cut)  # pretrained, not drawn
    assert "pooler.dense.weight" in cut
    assert not list((tmp_path / "cache").glob(".minilm-l1-*"))  # no temporary left


def test_more_layers_than_the_model_has_is_refused(tmp_path, tmp_path_factory):
    with pytest.raises(DerivedModelError, match="cannot keep 3 layers of a model with 2"):
        keep_first_layers(tiny_encoder(tmp_path_factory), 3, tmp_path / "out")


@pytest.fixture(scope="module")
def stsb_rows(glue_dir) -> list[dict]:
    return [json.loads(line) for split in ("train", "val", "test")
            for line in (glue_dir / "stsb" / f"{split}.jsonl").read_text().splitlines()]


def test_cut_vocabulary_tokenises_the_task_as_before_with_the_same_outputs(
        tmp_path, tmp_path_factory, glue_dir, stsb_rows):
    source = tiny_encoder(tmp_path_factory)
    used = used_token_ids(["stsb"], str(source), glue_dir)
    cut_dir = restrict_vocabulary(source, used, tmp_path / "cut")
    full_tok, cut_tok = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(
        cut_dir)
    keep = sorted(used | set(full_tok.all_special_ids))
    new_id = {old: new for new, old in enumerate(keep)}
    assert len(cut_tok) == len(keep) < len(full_tok) / 2
    for row in stsb_rows:
        for max_length in (None, 32):
            args = {"truncation": True, "max_length": max_length} if max_length else {}
            full = full_tok(row["text_a"], row["text_b"], **args)
            cut = cut_tok(row["text_a"], row["text_b"], **args)
            assert cut["input_ids"] == [new_id[i] for i in full["input_ids"]]
            assert cut["token_type_ids"] == full["token_type_ids"]
    full_model = AutoModel.from_pretrained(source).eval()
    cut_model = AutoModel.from_pretrained(cut_dir).eval()
    row = stsb_rows[0]
    with torch.no_grad():
        before = full_model(**full_tok(row["text_a"], row["text_b"], return_tensors="pt"))
        after = cut_model(**cut_tok(row["text_a"], row["text_b"], return_tensors="pt"))
    assert torch.allclose(before.pooler_output, after.pooler_output, atol=1e-6)
    assert cut_model.get_input_embeddings().weight.shape[0] == len(keep)


def test_cut_vocabulary_command_writes_a_model_every_command_reads(tmp_path, tmp_path_factory,
                                                                    glue_dir):
    source = tiny_encoder(tmp_path_factory)
    out = tmp_path / "cut"
    assert main(["-q", "cut-vocabulary", "--tasks", "cb", "copa", "--model", str(source),
                 "--out-dir", str(out), "--data-dir", str(glue_dir)]) == 0
    assert main(["-q", "prepare", "--task", "copa", "--model", str(out), "--out-dir",
                 str(tmp_path / "copa"), "--data-dir", str(glue_dir), "--max-length", "32"]) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".cut")]


def test_a_declared_task_is_refused_for_the_vocabulary_cut(tmp_path):
    from bayestune.tasks import TaskError
    from bayestune.tasks.custom import parse_custom_tasks

    declared = parse_custom_tasks({"reviews": {
        "data": str(tmp_path), "text_fields": ["text"], "label_field": "label",
        "labels": ["0", "1"], "metric": "accuracy"}})
    with pytest.raises(TaskError, match="built-in GLUE/SuperGLUE tasks only"):
        used_token_ids(["reviews"], "minilm", custom_tasks=declared)


def test_workflow_cuts_the_vocabulary_once_before_anything_reads_the_model(tmp_path):
    run = copy_workflow(tmp_path)
    config = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text())
    config.update(model="minilm-l1", model_vocabulary="tasks", glue_dir=str(tmp_path))
    (run / "cut.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "cb").mkdir()
    (tmp_path / "copa").mkdir()
    result = snakemake(run, "-n", "-p", "--cores", "1", "--configfile", "cut.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert job_counts(result.stdout)["cut_vocabulary"] == 1
    commands = [line for line in result.stdout.splitlines() if "python -m bayestune" in line]
    cut = next(c for c in commands if "cut-vocabulary" in c)
    assert "--tasks cb copa" in cut and "--model minilm-l1" in cut
    others = [c for c in commands if "cut-vocabulary" not in c and "--model" in c]
    assert others and all("--model data/tiny/model " in c for c in others)
    # the random mask reads no task data, but the cut model all the same
    random_job = result.stdout.split("rule mask:")[1].split("\n\n")[0]
    assert "input: data/tiny/model" in random_job
