"""Stage 2: masked AdamW leaves frozen scalars bit-identical, keeps state small, picks best val."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig

from bayestune.files import FileFormatError
from bayestune.finetune import (
    FinetuneConfig,
    MaskedUpdater,
    finetune,
    make_updater,
    train_step,
)
from bayestune.masks import masks_from_scores
from bayestune.models.text import build_text_model_from_config
from bayestune.optim import TransformersAdamW, jiant_schedule, no_decay_names
from bayestune.tasks.base import TaskData, TaskSpec, first_examples

VOCAB, LENGTH = 120, 12


def tiny_model(seed: int = 0):
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    return build_text_model_from_config(config, "classification", 2, seed)


def _examples(n: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
    labels = (ids[:, 1] % 2).long()  # learnable from one token
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
             "labels": labels[i]} for i in range(n)]


def tiny_data(seed: int = 0, n_train: int = 32) -> TaskData:
    train = DataLoader(_examples(n_train, seed), batch_size=8, shuffle=True,
                       generator=torch.Generator())
    val = DataLoader(_examples(16, seed + 1), batch_size=16)
    test = DataLoader(_examples(16, seed + 2), batch_size=16)
    return TaskData(train=train, val=val, test=test, seed=seed)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


SPEC = TaskSpec(name="tiny", benchmark="glue", metric_name="accuracy", metric=accuracy)


def random_mask(model, p: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(t.shape, generator=gen) for n, t in model.named_parameters()}
    return masks_from_scores(scores, [p])[p]


@pytest.mark.parametrize("schedule", ["linear", "reference"])
def test_frozen_scalars_stay_bit_identical_with_weight_decay(schedule) -> None:
    model = tiny_model()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = random_mask(model, 0.05)
    mask["encoder.embeddings.LayerNorm.bias"].zero_()  # one tensor with nothing selected
    config = FinetuneConfig(schedule=schedule, lr=1e-2, weight_decay=0.5, max_steps=6,
                            eval_every=3, warmup_ratio=0.0, epochs=10)
    result = finetune(model, tiny_data(), SPEC, config, mask=mask, seed=0, device="cpu",
                      progress=False)
    changed = 0
    for name, param in model.named_parameters():
        m = mask[name]
        assert torch.equal(param.detach()[~m], theta0[name][~m]), name
        changed += int((param.detach()[m] != theta0[name][m]).sum())
    assert changed > 0.9 * result.n_trainable
    assert result.n_trainable == sum(int(m.sum()) for m in mask.values())
    assert result.trainable_fraction == pytest.approx(result.n_trainable / result.n_total)
    assert not model.encoder.embeddings.LayerNorm.bias.requires_grad


def test_optimizer_state_only_for_trainable_scalars() -> None:
    model = tiny_model()
    mask = random_mask(model, 0.02)
    k = sum(int(m.sum()) for m in mask.values())
    config = FinetuneConfig(max_steps=2)
    updater = MaskedUpdater(model, mask, config.lr, config.weight_decay)
    batch = next(iter(tiny_data().train_epoch(0)))
    train_step(model, batch, updater, None, config, torch.device("cpu"))
    groups = updater.optimizer.param_groups
    assert len(groups) == 1 and len(groups[0]["params"]) == 1
    state = updater.optimizer.state[updater.packed]
    assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == k
    # dense gradients were freed by the gather hook
    assert all(p.grad is None for p in model.parameters())
    assert updater.packed.grad.abs().sum() > 0


def test_masked_gradient_matches_dense_gradient() -> None:
    model = tiny_model()
    mask = random_mask(model, 0.1)
    batch = next(iter(tiny_data().train_epoch(0)))
    model.eval()  # no dropout, so both passes see the same function
    model(batch).loss.backward()
    dense = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    updater = MaskedUpdater(model, mask, 1e-3, 0.0)
    updater.zero_grad()
    model(batch).loss.backward()
    expected = torch.cat([dense[n].reshape(-1)[mask[n].reshape(-1)]
                          for n, _ in model.named_parameters() if mask[n].any()])
    torch.testing.assert_close(updater.packed.grad, expected)


def test_early_stopping_restores_best_validation_step() -> None:
    scripted = iter([0.5, 0.9, 0.7, 0.6, 0.95, 0.99])
    seen: list[np.ndarray] = []

    def metric(logits: np.ndarray, labels: np.ndarray) -> float:
        seen.append(logits.copy())
        return next(scripted, 0.0)  # after the scripted val scores: the test call

    spec = TaskSpec(name="scripted", benchmark="glue", metric_name="scripted", metric=metric)
    data = tiny_data()
    data.test = data.val  # same examples: test logits must be those of the best val step
    config = FinetuneConfig(lr=1e-2, max_steps=40, eval_every=2, patience=2, warmup_ratio=0.0)
    result = finetune(tiny_model(), data, spec, config, mask=random_mask(tiny_model(), 0.2),
                      seed=0, device="cpu", progress=False)
    assert [h[0] for h in result.history] == [2, 4, 6, 8]
    assert [h[2] for h in result.history] == [0.5, 0.9, 0.7, 0.6]
    assert result.best_step == 4 and result.steps == 8 and result.val_score == 0.9
    assert np.array_equal(seen[-1], seen[1])
    assert not np.array_equal(seen[-1], seen[3])


def test_reference_updater_spares_biases_and_layernorm_from_decay() -> None:
    model = tiny_model()
    mask = random_mask(model, 0.2)
    updater = make_updater(model, mask, FinetuneConfig(schedule="reference", lr=0.1,
                                                       weight_decay=0.5))
    exempt = {n for n in mask if "bias" in n or "LayerNorm" in n}
    assert exempt == no_decay_names(model) and len(exempt) > 10
    decayed, spared = updater.packs
    assert decayed.numel() == sum(int(m.sum()) for n, m in mask.items() if n not in exempt)
    assert spared.numel() == sum(int(m.sum()) for n, m in mask.items() if n in exempt) > 0
    assert isinstance(updater.optimizer, TransformersAdamW)
    assert [g["weight_decay"] for g in updater.optimizer.param_groups] == [0.5, 0.0]
    before = [decayed.detach().clone(), spared.detach().clone()]
    updater.zero_grad()       # a zero gradient: the Adam step is 0, only the decay acts
    updater.step()
    torch.testing.assert_close(decayed.detach(), before[0] * (1 - 0.1 * 0.5))
    assert torch.equal(spared.detach(), before[1])
    updater.close()


def test_transformers_adamw_and_the_jiant_ramp_are_the_authors_formulas() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = TransformersAdamW([{"params": [p], "weight_decay": 0.1}], lr=0.01, eps=1e-8)
    ramp = jiant_schedule(opt, epochs=5, steps_per_epoch=4, warmup_ratio=0.1)  # 20, warm 2
    rates, want = [], p.detach().clone()
    m, v = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for t in range(1, 21):
        lr = opt.param_groups[0]["lr"]
        rates.append(lr)
        g = torch.tensor([0.3, -0.1, 1e-9], dtype=torch.float64) * t
        p.grad = g.clone()
        opt.step()
        ramp.step()
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        want = want - lr * (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t) * m / (v.sqrt() + 1e-8)
        want = want - lr * 0.1 * want       # decay after the step, on the new value
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=0)
    assert rates[:3] == [0.0, 0.005, 0.01] and rates[-1] == pytest.approx(0.01 / 18)
    assert opt.param_groups[0]["lr"] == 0.0  # t_total reached


def test_reference_schedule_stops_as_jiant_and_selects_on_the_val_subset() -> None:
    scripted = iter([0.5, 0.6, 0.4, 0.3, 0.95])
    sizes: list[int] = []

    def metric(logits: np.ndarray, labels: np.ndarray) -> float:
        sizes.append(len(labels))
        return next(scripted) if len(labels) == 10 else 0.7   # the whole split: 16

    spec = TaskSpec(name="scripted", benchmark="glue", metric_name="scripted", metric=metric)
    config = FinetuneConfig(schedule="reference", lr=1e-2, max_steps=0, epochs=100,
                            eval_every=3, patience=2, min_steps=12, val_subset=10)
    result = finetune(tiny_model(), tiny_data(), spec, config,
                      mask=random_mask(tiny_model(), 0.2), seed=0, device="cpu", progress=False)
    # validation after steps 2, 5, 8, 11 (jiant: when steps + 1 is a multiple of 3); patience
    # is used up at step 11, but the run must pass min_steps: it stops at 13 and validates once
    # more at the end, where the best score turns up
    assert [h[0] for h in result.history] == [2, 5, 8, 11, 13]
    assert result.steps == 13 and result.best_step == 13
    assert sizes == [10] * 5 + [16, 16]     # selection on 10 examples; val and test on all
    assert result.val_score == 0.7


def test_first_examples_cuts_the_stream() -> None:
    loader = DataLoader(_examples(16, 0), batch_size=6)
    assert [len(b["labels"]) for b in first_examples(loader, 10)] == [6, 4]
    assert [len(b["labels"]) for b in first_examples(loader, 12)] == [6, 6]
    assert [len(b["labels"]) for b in first_examples(loader, 0)] == [6, 6, 4]
    assert [len(b["input_ids"]) for b in first_examples(loader, 3)] == [3]


def test_full_finetuning_without_mask_trains_everything() -> None:
    model = tiny_model()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = FinetuneConfig(lr=1e-2, max_steps=4, eval_every=4)
    result = finetune(model, tiny_data(), SPEC, config, mask=None, seed=0, device="cpu",
                      progress=False)
    assert result.n_trainable == result.n_total and result.trainable_fraction == 1.0
    assert result.steps == 4 and len(result.history) == 1
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), theta0[n])]
    assert "encoder.encoder.layer.0.attention.self.query.weight" in moved
    assert 0.0 <= result.test_score <= 1.0


def test_training_runs_past_one_epoch_and_learns() -> None:
    model = tiny_model()
    config = FinetuneConfig(lr=3e-3, max_steps=40, eval_every=10, patience=10, warmup_ratio=0.1)
    result = finetune(model, tiny_data(n_train=64), SPEC, config, mask=None, seed=0,
                      device="cpu", progress=False)
    assert result.steps == 40  # 8 batches per epoch: five epochs
    losses = [loss for _, loss, _ in result.history]
    assert losses[-1] < 0.4 < 0.6 < losses[0]  # from chance level (ln 2) to well below it


def test_bad_masks_and_configs_are_rejected() -> None:
    model = tiny_model()
    empty = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="selects no scalar"):
        MaskedUpdater(model, empty, 1e-3, 0.0)
    partial = dict(list(empty.items())[1:])
    with pytest.raises(FileFormatError, match="missing"):
        MaskedUpdater(model, partial, 1e-3, 0.0)
    with pytest.raises(ValueError, match="at least 1"):
        FinetuneConfig(eval_every=0)
    with pytest.raises(ValueError, match="at least 1"):
        FinetuneConfig(max_steps=0)       # linear needs its length; reference may run on
    assert FinetuneConfig(schedule="reference", max_steps=0).max_steps == 0
    with pytest.raises(ValueError, match="schedule 'cosine'"):
        FinetuneConfig(schedule="cosine")


def test_bench_smoke_in_process(tmp_path) -> None:
    from bayestune.bench import print_table, run_bench
    from bayestune.files import read_json

    out = tmp_path / "bench.json"
    result = run_bench(out, model="tiny-random", steps=2, warmup=1, device="cpu", seq_len=16,
                       isolate=False)
    assert read_json(out) == json_roundtrip(result)
    for key in ("stage1_step_ratio", "stage2_step_ratio", "stage1_peak_mem_ratio",
                "stage2_peak_mem_ratio", "delta_bytes_ratio"):
        assert result[key] > 0, key
    assert len(result["full_step_times"]) == 2
    assert result["stage2_n_trainable"] == int(0.005 * result["n_params"])
    assert 0 < result["delta_scalars"] <= result["stage2_n_trainable"]
    assert result["delta_bytes"] < result["full_state_bytes"]
    # the floor: 28 bytes per sampled scalar over the measured bandwidth
    assert result["stage1_extra_bytes"] == 28 * result["stage1_n_trainable"]
    assert result["stage1_floor_seconds"] == pytest.approx(
        result["stage1_extra_bytes"] / result["bandwidth_bytes_per_s"])
    assert 1 < result["stage1_floor_step_ratio"]
    print_table(result)


def test_bench_takes_a_model_folder(tmp_path, tmp_path_factory) -> None:
    """A carried model folder (make gpu-carry's .carry/minilm, where pip cannot install the
    MiniLM package) is benched like the named models; an unknown name says what is allowed."""
    from shared_runs import tiny_encoder

    from bayestune.bench import run_bench
    from bayestune.errors import ConfigError

    folder = tiny_encoder(tmp_path_factory)
    result = run_bench(tmp_path / "bench.json", model=str(folder), steps=1, warmup=0,
                       device="cpu", seq_len=8, isolate=False)
    assert result["model"] == str(folder) and result["stage1_step_seconds"] > 0
    with pytest.raises(ConfigError, match="or a model folder"):
        run_bench(tmp_path / "x.json", model=str(tmp_path / "absent"), device="cpu")


def json_roundtrip(record: dict) -> dict:
    import json

    return json.loads(json.dumps(record))


def _finetune_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bayestune.finetune"]


def test_log_lines_every_n_steps_with_lr_and_validation(caplog) -> None:
    caplog.set_level("INFO", logger="bayestune.finetune")
    config = FinetuneConfig(lr=1e-2, max_steps=8, eval_every=4, patience=5, warmup_ratio=0.0)
    result = finetune(tiny_model(), tiny_data(), SPEC, config, mask=None, seed=0,
                      device="cpu", progress=False, log_every=3)
    lines = _finetune_lines(caplog)
    assert [line.split(":")[0] for line in lines] == [
        f"finetune tiny step {s}/8" for s in (3, 4, 6, 8)]
    # linear decay from 1e-2 to 0 at step 8, no warm-up
    assert [line.split("lr ")[1].split(",")[0] for line in lines] == [
        "0.00625", "0.005", "0.0025", "0"]
    scores = [float(line.split("validation ")[1].split()[0]) for line in lines[1::2]]
    assert "validation" not in lines[0] + lines[2]
    assert scores == pytest.approx([h[2] for h in result.history], abs=1e-4)


def test_reference_schedule_logs_its_last_validation(caplog) -> None:
    caplog.set_level("INFO", logger="bayestune.finetune")
    config = FinetuneConfig(schedule="reference", lr=1e-2, max_steps=7, epochs=100,
                            eval_every=3, patience=5)
    finetune(tiny_model(), tiny_data(), SPEC, config, mask=random_mask(tiny_model(), 0.2),
             seed=0, device="cpu", progress=False, log_every=100)
    lines = _finetune_lines(caplog)
    # jiant validates after steps 2 and 5, and once more at the end (step 7)
    assert [line.split(":")[0] for line in lines] == [
        f"finetune tiny step {s}/7" for s in (2, 5, 7)]
    assert all("validation" in line for line in lines)


def test_log_every_comes_from_the_flag_the_environment_or_the_default(monkeypatch) -> None:
    from bayestune.cli import LOG_EVERY, build_parser

    command = ["prepare", "--task", "rte", "--model", "m", "--out-dir", "out"]
    monkeypatch.delenv("BAYESTUNE_LOG_EVERY", raising=False)
    assert build_parser().parse_args(command).log_every == LOG_EVERY
    monkeypatch.setenv("BAYESTUNE_LOG_EVERY", "7")  # what the workflow's config key sets
    assert build_parser().parse_args(command).log_every == 7
    assert build_parser().parse_args(["--log-every", "0", *command]).log_every == 0
