"""Mask-selection methods and LoRA on a tiny random BERT task model and on hand-built toys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from bayestune.masks import budget_count
from bayestune.methods import (
    METHODS,
    LoraSettings,
    MethodConfig,
    lora_trainable_fraction,
    mask_overlap,
    merge_lora,
    method_scores,
    select_masks,
    wrap_lora,
)
from bayestune.models.base import TaskModel, TaskOutput, is_head, task_loss

BUDGETS = [0.01, 0.05, 0.2]
FAST = MethodConfig(magnitude_steps=3, fisher_batches=3, sam_steps=3)
HIDDEN, LAYERS, VOCAB = 16, 2, 50


class TinyBert(TaskModel):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                            num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings=16)
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, batch):
        hidden = self.encoder(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).last_hidden_state
        logits = self.head(hidden[:, 0])
        loss = F.cross_entropy(logits, batch["labels"]) if "labels" in batch else None
        return TaskOutput(loss, logits)


def bert_batches(epoch: int) -> list[dict]:
    """Two batches per epoch, the same ones for the same epoch (like TaskData.train_epoch)."""
    gen = torch.Generator().manual_seed(epoch)
    return [{"input_ids": torch.randint(0, VOCAB, (4, 6), generator=gen),
             "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=gen)} for _ in range(2)]


class Toy(TaskModel):
    """loss = w_head * (w . x): the gradient of encoder scalar i is w_head * x_i."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.encoder = nn.Linear(n, 1, bias=False)
        self.head = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.encoder.weight.zero_()
            self.head.weight.fill_(1.0)

    def forward(self, batch):
        logits = self.head(self.encoder(batch["x"]))
        return TaskOutput(logits.mean(), logits)


def toy_batches(rows: list[list[float]]):
    return lambda epoch: [{"x": torch.tensor([row], dtype=torch.float32)} for row in rows]


def selected(mask: dict[str, torch.Tensor], name: str) -> set[int]:
    return set(torch.nonzero(mask[name].reshape(-1)).squeeze(1).tolist())


@pytest.fixture(scope="module")
def model() -> TinyBert:
    return TinyBert()


def random_scores_like(model: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    return {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}


def run(name, model, budgets=BUDGETS, seed=0, config=FAST, scores=None, batches=bert_batches):
    if name == "bayestune" and scores is None:
        scores = random_scores_like(model)
    return select_masks(name, model, batches, task_loss, budgets, seed, config, scores=scores)


@pytest.mark.parametrize("name", ["bayestune", "random", "magnitude", "fisher"])
def test_global_methods_give_nested_masks_of_budget_size(model, name):
    masks = run(name, model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters())
    assert list(masks) == BUDGETS
    previous = None
    for budget in BUDGETS:
        mask = masks[budget]
        assert {n: m.shape for n, m in mask.items()} == shapes
        assert all(m.dtype == torch.bool for m in mask.values())
        assert sum(int(m.sum()) for m in mask.values()) == budget_count(budget, total)
        if previous is not None:
            assert all(bool((previous[n] <= mask[n]).all()) for n in mask)
        previous = mask


def test_sam_keeps_the_head_and_ranks_within_each_tensor(model):
    masks = run("sam", model)
    for budget, mask in masks.items():
        for name, m in mask.items():
            if is_head(name):
                assert bool(m.all()), name
            else:
                assert int(m.sum()) == budget_count(budget, m.numel()), name
    small, large = masks[BUDGETS[0]], masks[BUDGETS[-1]]
    assert all(bool((small[n] <= large[n]).all()) for n in small)


def test_full_and_bitfit_follow_their_own_rule(model):
    full = run("full", model)
    bitfit = run("bitfit", model)
    expected = {n for n, _ in model.named_parameters() if n.endswith(".bias") or is_head(n)}
    assert any("LayerNorm.bias" in n for n in expected)
    for budget in BUDGETS:
        assert all(bool(m.all()) for m in full[budget].values())
        for name, m in bitfit[budget].items():
            assert bool(m.all()) if name in expected else not bool(m.any()), name
    assert bitfit[BUDGETS[0]] is bitfit[BUDGETS[-1]]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_leave_the_model_and_global_rng_alone(model, name):
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.train()
    run(name, model, budgets=[0.05])
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert p.requires_grad and p.grad is None, n
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_random_is_seeded(model):
    first, again, other = (run("random", model, seed=s)[0.05] for s in (1, 1, 2))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


# Column 1 has the largest gradients but they flip sign from batch to batch.
ROWS = [[5, 8, 3, 0.1, 0, 1], [5, -8, 3, 0.1, 0, 1]] * 2


def test_fisher_ranks_squared_gradients():
    config = MethodConfig(fisher_batches=4)
    masks = run("fisher", Toy(), budgets=[0.3, 0.5], config=config, batches=toy_batches(ROWS))
    # D = 7: floor(0.3 * 7) = 2, floor(0.5 * 7) = 3 scalars; fisher = sum of x_i^2
    assert selected(masks[0.3], "encoder.weight") == {0, 1}
    assert selected(masks[0.5], "encoder.weight") == {0, 1, 2}
    assert not masks[0.5]["head.weight"].any()
    scores = method_scores("fisher", Toy(), toy_batches(ROWS), task_loss, 0, config)
    assert torch.allclose(scores["encoder.weight"][0], torch.tensor([100, 256, 36, 0.04, 0, 4.]))


def test_sam_ranks_the_summed_gradient_where_opposite_signs_cancel():
    config = MethodConfig(sam_steps=4)
    masks = run("sam", Toy(), budgets=[0.3, 0.5], config=config, batches=toy_batches(ROWS))
    # per tensor over the 6 encoder scalars: 1 and 3 of them; |sum x_i| puts column 1 last
    assert selected(masks[0.3], "encoder.weight") == {0}
    assert selected(masks[0.5], "encoder.weight") == {0, 2, 5}
    assert masks[0.3]["head.weight"].all()


def test_magnitude_picks_the_scalars_that_moved_most():
    config = MethodConfig(magnitude_steps=3, magnitude_lr=0.1)
    rows = [[1, 0, 2, 0, 0, 3]]
    scores = method_scores("magnitude", Toy(), toy_batches(rows), task_loss, 0, config)
    moved = scores["encoder.weight"][0]
    # Adam moves a scalar with a steady gradient by lr per step; one with none not at all.
    assert torch.allclose(moved[[0, 2, 5]], torch.full((3,), 0.3), atol=2e-3)
    assert torch.equal(moved[[1, 3, 4]], torch.zeros(3))
    # The head's gradient w . x is zero at theta0, so it moves for two steps only.
    assert 0 < scores["head.weight"].item() < 0.25
    masks = run("magnitude", Toy(), budgets=[0.45, 0.6], config=config,
                batches=toy_batches(rows))
    assert selected(masks[0.45], "encoder.weight") == {0, 2, 5}
    assert not masks[0.45]["head.weight"].any() and masks[0.6]["head.weight"].all()


def test_bad_method_input_gets_a_clear_error(model):
    with pytest.raises(ValueError, match="unknown mask method 'nope'; known methods: bayestune"):
        run("nope", model)
    with pytest.raises(ValueError, match="pass them as scores"):
        select_masks("bayestune", model, bert_batches, task_loss, [0.1], 0, FAST)
    partial = dict(list(random_scores_like(model).items())[1:])
    with pytest.raises(ValueError, match="score file does not match the model: 1 model param"):
        run("bayestune", model, scores=partial)
    with pytest.raises(ValueError, match="takes no scores"):
        run("full", model, scores=random_scores_like(model))
    with pytest.raises(ValueError, match="yielded no batches"):
        run("fisher", model, batches=lambda epoch: [])
    with pytest.raises(ValueError, match="needs training batches; pass --data"):
        run("sam", model, batches=None)
    with pytest.raises(ValueError, match="has no computed score"):
        method_scores("bitfit", model, bert_batches, task_loss, 0, FAST)


def test_mask_overlap_is_jaccard_over_all_tensors():
    def mask(w, v):
        return {"w": torch.tensor(w, dtype=torch.bool), "v": torch.tensor(v, dtype=torch.bool)}

    table = mask_overlap({"a": mask([1, 1, 0, 0], [1]), "b": mask([0, 1, 1, 0], [1]),
                          "c": mask([0, 0, 0, 0], [0])})
    assert list(table.index) == list(table.columns) == ["a", "b", "c"]
    assert table.loc["a", "b"] == table.loc["b", "a"] == pytest.approx(2 / 4)
    assert table.loc["a", "c"] == table.loc["b", "c"] == 0.0
    assert (table.to_numpy().diagonal() == 1.0).all()
    with pytest.raises(ValueError, match="different tensors or shapes"):
        mask_overlap({"a": mask([1, 0], [1]), "b": mask([1, 0, 0], [1])})


def test_lora_trains_only_adapters_and_head_and_merges_back(model):
    settings = LoraSettings(rank=2, alpha=4, dropout=0.1)
    wrapped = wrap_lora(model, settings)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or is_head(n) for n in trainable)
    assert {n for n in trainable if is_head(n)} == {"head.weight", "head.bias"}
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable if "lora_" in n}
    assert adapted == {"query", "value"}
    assert all(p.requires_grad for p in model.parameters())  # the given model is untouched

    batch = bert_batches(0)[0]
    out = wrapped(batch)
    assert out.logits.shape == (4, 3) and torch.isfinite(out.loss)
    total = sum(p.numel() for p in model.parameters())
    per_module = 2 * HIDDEN * settings.rank  # A: r x hidden, B: hidden x r
    expected = LAYERS * 2 * per_module + HIDDEN * 3 + 3
    assert lora_trainable_fraction(wrapped, total) == pytest.approx(expected / total)

    with torch.no_grad():  # lora_B starts at zero; make the update visible
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_()
    wrapped.eval()
    merged = merge_lora(wrapped).eval()
    assert [n for n, _ in merged.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert isinstance(merged, TinyBert) and all(p.requires_grad for p in merged.parameters())
    with torch.no_grad():
        assert torch.allclose(merged(batch).logits, wrapped(batch).logits, atol=1e-5)
    base, new = model.state_dict(), merged.state_dict()
    changed = {n for n in base if not torch.equal(base[n], new[n])}
    assert changed == {f"encoder.encoder.layer.{i}.attention.self.{m}.weight"
                       for i in range(LAYERS) for m in ("query", "value")}


def test_lora_rejects_modules_the_encoder_lacks(model):
    with pytest.raises(ValueError, match="target_modules"):
        wrap_lora(model, LoraSettings(target_modules="qkv"))
