"""Mask-selection methods and LoRA on a tiny random BERT task model and on hand-built toys: each
method against its published definition, the registry, and magnitude's start file end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from bayestune import files
from bayestune.masks import budget_count, masks_from_scores
from bayestune.methods import (
    METHODS,
    REGISTRY,
    LoraSettings,
    MethodConfig,
    MethodError,
    lora_trainable_fraction,
    mask_overlap,
    merge_lora,
    method_scores,
    published_label,
    ranking_options,
    select_masks,
    wrap_lora,
)
from bayestune.methods.fisher import single_examples
from bayestune.methods.magnitude import magnitude_start
from bayestune.methods.random_mask import keep_probability
from bayestune.models.base import TaskModel, TaskOutput, is_head, task_loss

BUDGETS = [0.01, 0.05, 0.2]
FAST = MethodConfig(magnitude_steps=3, lt_sft_steps=3, fisher_examples=6, sam_steps=3)
HIDDEN, LAYERS, VOCAB = 16, 2, 50
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


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


def nested(small: dict, large: dict) -> bool:
    return all(bool((small[n] <= large[n]).all()) for n in small)


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


# --- the registry ----------------------------------------------------------------------------
def test_registry_names_every_method_once_with_its_published_row():
    from bayestune.reports import PUBLISHED_GLUE

    assert list(REGISTRY) == ["full", "lora", "bitfit", "random", "magnitude", "lt-sft",
                              "fisher", "sam", "bayestune"]
    assert set(METHODS) == set(REGISTRY) - {"lora"}
    labels = {name: spec.published for name, spec in REGISTRY.items()}
    assert labels == {"full": "full fine-tuning", "lora": "LoRA", "bitfit": "BitFit",
                      "random": "random mask", "magnitude": "magnitude pruning", "lt-sft": None,
                      "fisher": None, "sam": "SAM", "bayestune": None}
    assert {label for label in labels.values() if label} <= set(PUBLISHED_GLUE)
    assert [n for n, s in REGISTRY.items() if s.needs_data] == ["magnitude", "lt-sft", "fisher",
                                                                "sam"]
    assert [n for n, s in REGISTRY.items() if s.writes_start] == ["magnitude"]


def test_head_defaults_per_method_and_config_overrides():
    default = MethodConfig()
    expect = {"random": (False, True, False), "magnitude": (True, True, False),
              "sam": (True, True, False), "fisher": (False, True, True),
              "lt-sft": (False, True, False), "bayestune": (False, False, True)}
    for name, (per_tensor, keep_head, counts) in expect.items():
        assert ranking_options(name, default) == {
            "per_tensor": per_tensor, "keep_head": keep_head,
            "head_counts_toward_budget": counts}, name
    changed = MethodConfig(per_tensor=False, keep_head=False)
    assert ranking_options("sam", changed)["per_tensor"] is False
    assert ranking_options("sam", changed)["keep_head"] is False
    # A run whose ranking differs from the published definition gets no published row.
    sam = {**ranking_options("sam", default), "sam_steps": 600, "grad_clip": 1.0,
           "architecture": "jiant"}
    assert published_label("sam", sam) == "SAM"
    assert published_label("sam", {**sam, **ranking_options("sam", changed)}) is None
    assert published_label("lt-sft", ranking_options("lt-sft", default)) is None
    assert published_label("lora", {"lora_preset": "default", "architecture": "jiant"}) is None
    assert published_label("lora", {"lora_preset": "sam", "architecture": "jiant"}) == "LoRA"
    with pytest.raises(MethodError, match="unknown method 'nope'; known methods: full, lora"):
        published_label("nope", {})


def test_published_row_needs_the_source_definition_and_stage_2():
    """SAM's row: the repo's ranking, burn-in 600 (scripts/train.sh), jiant's model, and
    stage 2 as train.sh trains it (lr 1e-4, batch 16, min 20000 steps, eval every 500,
    patience 40, jiant's ramp over 10000 epochs, selection on 500 validation examples)."""
    from bayestune.methods import published_differences
    from bayestune.methods.registry import SAM_REPO_STAGE2

    sam = {**ranking_options("sam", MethodConfig()), "sam_steps": 600, "grad_clip": 1.0,
           "architecture": "jiant"}
    stage2 = dict(SAM_REPO_STAGE2)
    assert published_label("sam", sam, stage2) == "SAM"
    assert published_differences("sam", sam, stage2) == []
    assert published_label("sam", sam, {**stage2, "lr": 1e-3}) is None
    assert published_differences("sam", {**sam, "sam_steps": 500}, {**stage2, "lr": 1e-3}) == [
        "sam_steps 500, published 600", "stage-2 lr 0.001, published 0.0001"]
    assert published_differences("sam", {**sam, "architecture": "first-token"}, stage2) == [
        "architecture 'first-token', published 'jiant'"]
    assert published_label("full", {"architecture": "jiant"}, {**stage2, "lr": 2e-5}) is None
    assert published_label("full", {"architecture": "jiant"}, stage2) == "full fine-tuning"
    assert published_differences("bayestune", {}, {}) == []  # no published row to stand beside


# --- masks of every method ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bayestune", "lt-sft", "fisher"])
def test_global_methods_give_nested_masks_of_budget_size(model, name):
    masks = run(name, model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if is_head(n))
    assert list(masks) == BUDGETS and masks.start is None
    for budget in BUDGETS:
        mask = masks[budget]
        assert {n: m.shape for n, m in mask.items()} == shapes
        assert all(m.dtype == torch.bool for m in mask.values())
        # lt-sft: the head outside the budget, k = p x the rest (composable-sft)
        expect = (budget_count(budget, total - head) + head if name == "lt-sft"
                  else budget_count(budget, total))
        assert sum(int(m.sum()) for m in mask.values()) == expect
    assert nested(masks[BUDGETS[0]], masks[BUDGETS[1]])
    assert nested(masks[BUDGETS[1]], masks[BUDGETS[2]])


@pytest.mark.parametrize("name", ["sam", "magnitude"])
def test_sam_repo_methods_keep_the_head_and_rank_within_each_tensor(model, name):
    masks = run(name, model)
    for budget, mask in masks.items():
        for tensor, m in mask.items():
            if is_head(tensor):
                assert bool(m.all()), tensor
            else:
                assert int(m.sum()) == budget_count(budget, m.numel()), tensor
    assert nested(masks[BUDGETS[0]], masks[BUDGETS[-1]])


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


@pytest.mark.parametrize("name", list(METHODS))
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


# --- random: the SAM repo's randmask ------------------------------------------------------------
class Wide(TaskModel):
    """Two encoder tensors of 20000 and 5000 scalars and a head of 30."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"a": nn.Linear(200, 100, bias=False),
                                      "b": nn.Linear(100, 50, bias=False)})
        self.head = nn.Linear(10, 3)


def test_random_keeps_each_encoder_scalar_with_probability_p_and_the_whole_head():
    wide = Wide()
    masks = select_masks("random", wide, None, task_loss, [0.05, 0.2], 3, MethodConfig())
    for p, mask in masks.items():
        assert mask["head.weight"].all() and mask["head.bias"].all()
        for name in ("encoder.a.weight", "encoder.b.weight"):
            n = mask[name].numel()
            sd = (n * p * (1 - p)) ** 0.5
            assert abs(int(mask[name].sum()) - n * p) < 5 * sd, (name, p)  # binomial, drawn
    assert nested(masks[0.05], masks[0.2])
    again = select_masks("random", wide, None, task_loss, [0.05], 3, MethodConfig())[0.05]
    other = select_masks("random", wide, None, task_loss, [0.05], 4, MethodConfig())[0.05]
    assert all(torch.equal(again[n], masks[0.05][n]) for n in again)
    assert not torch.equal(other["encoder.a.weight"], again["encoder.a.weight"])


def test_random_with_the_head_inside_the_budget_or_drawn_like_the_rest():
    wide = Wide()
    n_total, n_head = 25033, 33
    inside = MethodConfig(head_counts_toward_budget=True)
    assert keep_probability(0.1, n_total, n_head, True, True) == pytest.approx(
        (0.1 * n_total - n_head) / (n_total - n_head))
    mask = select_masks("random", wide, None, task_loss, [0.1], 0, inside)[0.1]
    assert mask["head.weight"].all()
    assert abs(sum(int(m.sum()) for m in mask.values()) - 0.1 * n_total) < 5 * (
        n_total * 0.1 * 0.9) ** 0.5
    drawn = select_masks("random", wide, None, task_loss, [0.1], 0,
                         MethodConfig(keep_head=False))[0.1]
    assert not drawn["head.weight"].all()


# --- magnitude: the SAM repo's magprun ------------------------------------------------------------
def test_magnitude_ranks_abs_theta_per_tensor_after_real_updates_and_hands_over_its_start():
    toy = Toy()
    with torch.no_grad():  # scalar 3 is large and gets no gradient: |theta| keeps it first
        toy.encoder.weight[0, 3] = 5.0
    rows = [[1, 0, 2, 0, 0, 3]]
    config = MethodConfig(magnitude_steps=4, magnitude_lr=0.1, magnitude_warmup_epochs=0,
                          grad_clip=0)
    masks = select_masks("magnitude", toy, toy_batches(rows), task_loss, [0.2, 0.7], 0, config)
    start = masks.start
    # Three Adam updates of lr 0.1 against a steady gradient, weight decay 0.01 of theta.
    moved = start["encoder.weight"][0] - toy.encoder.weight[0].detach()
    assert torch.allclose(moved[[0, 2, 5]], torch.full((3,), -0.3), atol=2e-3)
    assert torch.allclose(moved[[1, 4]], torch.zeros(2))
    assert -0.02 < float(moved[3]) < -0.01  # weight decay only: 3 x 0.1 x 0.01 x 5
    for p, mask in masks.items():
        k = budget_count(p, 6)
        expect = set(torch.topk(start["encoder.weight"][0].abs(), k).indices.tolist())
        assert selected(mask, "encoder.weight") == expect and 3 in expect
        assert mask["head.weight"].all()
    lt_sft = select_masks("lt-sft", toy, toy_batches(rows), task_loss, [0.5], 0,
                          MethodConfig(lt_sft_steps=3, lt_sft_lr=0.1))
    assert lt_sft.start is None and 3 not in selected(lt_sft[0.5], "encoder.weight")


def test_magnitude_learning_rate_rises_as_jiants_warm_up_does():
    rows = [[1, 1, 1, 1, 1, 1]]  # one batch per epoch: warm-up of 10 epochs = 10 steps
    config = MethodConfig(magnitude_steps=5, magnitude_lr=0.1, magnitude_warmup_epochs=10,
                          grad_clip=1.0)
    start = magnitude_start(Toy(), toy_batches(rows), task_loss, 0, config)
    # Four updates at rates 0, 0.01, 0.02, 0.03 (the schedule starts at 0); Adam moves a steady
    # gradient by its rate, whatever clipping did to the gradient's size.
    assert torch.allclose(start["encoder.weight"][0], torch.full((6,), -0.06), atol=1e-3)


# --- lt-sft: LT-SFT, restart from theta0 ----------------------------------------------------------
def test_lt_sft_picks_the_scalars_that_moved_most_and_restarts():
    config = MethodConfig(lt_sft_steps=3, lt_sft_lr=0.1)
    rows = [[1, 0, 2, 0, 0, 3]]
    scores = method_scores("lt-sft", Toy(), toy_batches(rows), task_loss, 0, config)
    moved = scores["encoder.weight"][0]
    assert torch.allclose(moved[[0, 2, 5]], torch.full((3,), 0.3), atol=2e-3)
    assert torch.equal(moved[[1, 3, 4]], torch.zeros(3))
    # The head's gradient w . x is zero at theta0, so it moves for two steps only.
    assert 0 < scores["head.weight"].item() < 0.25
    # composable-sft: the head is not maskable and trains fully; k = p x the 6 encoder scalars
    # (over all 7 scalars, 0.3 would give floor(2.1) = 2)
    masks = run("lt-sft", Toy(), budgets=[0.5, 0.3], config=config, batches=toy_batches(rows))
    assert masks.start is None
    assert selected(masks[0.5], "encoder.weight") == {0, 2, 5}
    assert len(selected(masks[0.3], "encoder.weight") & {0, 2, 5}) == 1  # floor(0.3 x 6)
    assert int(masks[0.3]["encoder.weight"].sum()) == 1
    assert masks[0.5]["head.weight"].all() and masks[0.3]["head.weight"].all()


# --- sam: the SAM repo's bsearch ------------------------------------------------------------------
def test_sam_sums_clipped_gradients_at_theta0_without_updating(model):
    config = MethodConfig(sam_steps=4, grad_clip=0.5)
    scores = method_scores("sam", model, bert_batches, task_loss, 7, config)
    # Brute force: the first sam_steps - 1 batches (into the next epoch), each gradient at
    # theta0 in training mode with the same dropout draws, clipped to global norm 0.5, summed.
    work = TinyBert()
    work.load_state_dict(model.state_dict())
    work.train()
    total = {n: torch.zeros_like(p) for n, p in work.named_parameters()}
    batches = bert_batches(0) + bert_batches(1)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        for batch in batches[:3]:
            grads = torch.autograd.grad(task_loss(work, batch), list(work.parameters()))
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            scale = min(1.0, 0.5 / (float(norm) + 1e-6))
            for (n, _), g in zip(work.named_parameters(), grads, strict=True):
                total[n] += g * scale
    for n, t in total.items():
        assert torch.allclose(scores[n], t.abs(), atol=1e-6, rtol=1e-4), n
    assert norm > 0.5  # the clipping was active


def test_sam_ranks_the_summed_gradient_where_opposite_signs_cancel():
    rows = [[5, 8, 3, 0.1, 0, 1], [5, -8, 3, 0.1, 0, 1]] * 2 + [[0, 0, 0, 0, 0, 0]]
    config = MethodConfig(sam_steps=5, grad_clip=0)
    masks = run("sam", Toy(), budgets=[0.3, 0.5], config=config, batches=toy_batches(rows))
    # per tensor over the 6 encoder scalars: 1 and 3 of them; |sum x_i| puts column 1 last
    assert selected(masks[0.3], "encoder.weight") == {0}
    assert selected(masks[0.5], "encoder.weight") == {0, 2, 5}
    assert masks[0.3]["head.weight"].all()


# --- fisher: the FISH mask -----------------------------------------------------------------------
def test_fisher_sums_squared_per_example_gradients_like_a_loop_over_examples(model):
    config = MethodConfig(fisher_examples=6)
    scores = method_scores("fisher", model, bert_batches, task_loss, 0, config)
    work = TinyBert()
    work.load_state_dict(model.state_dict())
    work.eval()  # FISH scores a model fresh from from_pretrained: no dropout
    batch = bert_batches(0)
    inputs = torch.cat([b["input_ids"] for b in batch])
    labels = torch.cat([b["labels"] for b in batch])
    expect = {n: torch.zeros_like(p) for n, p in work.named_parameters()}
    for i in range(6):
        one = {"input_ids": inputs[i:i + 1], "attention_mask": torch.ones(1, 6, dtype=torch.long),
               "labels": labels[i:i + 1]}
        grads = torch.autograd.grad(task_loss(work, one), list(work.parameters()))
        for (n, _), g in zip(work.named_parameters(), grads, strict=True):
            expect[n] += g.square()
    for n, t in expect.items():
        assert torch.allclose(scores[n], t, atol=1e-7, rtol=1e-4), n


def test_fisher_keeps_the_head_inside_the_budget():
    rows = [[5, 8, 3, 0.1, 0, 1], [5, -8, 3, 0.1, 0, 1]]
    config = MethodConfig(fisher_examples=100)  # more than an epoch: one pass only
    masks = run("fisher", Toy(), budgets=[0.3, 0.5], config=config, batches=toy_batches(rows))
    # D = 7 with a head of 1: floor(0.3 * 7) = 2 -> the head and 1 encoder scalar; sum x_i^2
    assert selected(masks[0.3], "encoder.weight") == {1}
    assert selected(masks[0.5], "encoder.weight") == {0, 1}
    assert masks[0.3]["head.weight"].all()
    scores = method_scores("fisher", Toy(), toy_batches(rows), task_loss, 0, config)
    assert torch.allclose(scores["encoder.weight"][0], torch.tensor([50, 128, 18, 0.02, 0, 2.]))


def test_single_examples_keep_choice_and_span_dimensions():
    batch = {"input_ids": torch.arange(24).view(3, 2, 4), "span1_mask": torch.ones(3, 4),
             "labels": torch.tensor([0, 1, 0]), "name": "copa"}
    ones = list(single_examples(batch))
    assert len(ones) == 3
    assert ones[1]["input_ids"].shape == (1, 2, 4) and ones[1]["span1_mask"].shape == (1, 4)
    assert torch.equal(ones[2]["input_ids"][0], batch["input_ids"][2])
    assert ones[0]["name"] == "copa"
    with pytest.raises(MethodError, match="disagree on the batch size"):
        list(single_examples({"a": torch.ones(2, 3), "b": torch.ones(3)}))


def test_bad_method_input_gets_a_clear_error(model):
    with pytest.raises(ValueError, match="unknown mask method 'nope'; mask methods: full"):
        run("nope", model)
    with pytest.raises(ValueError, match="an adapter, not a mask"):
        run("lora", model)
    with pytest.raises(ValueError, match="pass them as scores"):
        select_masks("bayestune", model, bert_batches, task_loss, [0.1], 0, FAST)
    partial = dict(list(random_scores_like(model).items())[1:])
    with pytest.raises(ValueError, match="score file does not match the model: 1 model param"):
        run("bayestune", model, scores=partial)
    for name in ("full", "random", "magnitude"):
        with pytest.raises(ValueError, match="takes no scores"):
            run(name, model, scores=random_scores_like(model))
    with pytest.raises(ValueError, match="yielded no batches"):
        run("sam", model, batches=lambda epoch: [])
    with pytest.raises(ValueError, match="yielded no example"):
        run("fisher", model, batches=lambda epoch: [])
    with pytest.raises(ValueError, match="needs training batches; pass --data"):
        run("magnitude", model, batches=None)
    with pytest.raises(ValueError, match="has no computed score"):
        method_scores("bitfit", model, bert_batches, task_loss, 0, FAST)
    with pytest.raises(ValueError, match="count the ranking step too"):
        MethodConfig(sam_steps=1)


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


# --- LoRA ----------------------------------------------------------------------------------------
def test_lora_trains_only_adapters_and_head_and_merges_back(model):
    settings = LoraSettings(rank=2, alpha=4, dropout=0.1)
    assert settings.effective_preset() == "custom"
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


def test_lora_sam_settings_adapt_every_linear_layer_and_freeze_the_head(model):
    settings = LoraSettings(preset="sam")
    assert settings.effective_preset() == "sam" and settings.resolved()["rank"] == 4
    wrapped = wrap_lora(model, settings)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the head stays frozen
    layers = {n.split(".lora_")[0].split(".layer.", 1)[1].split(".", 1)[1]
              for n in trainable}
    assert layers == {"attention.self.query", "attention.self.key", "attention.self.value",
                      "attention.output.dense", "intermediate.dense", "output.dense"}
    inter = 32
    per_layer = 4 * (4 * 2 * HIDDEN + (HIDDEN + inter) + (inter + HIDDEN))
    assert sum(wrapped.get_parameter(n).numel() for n in trainable) == LAYERS * per_layer
    lora_b = [wrapped.get_parameter(n) for n in trainable if "lora_B" in n]
    assert all(bool(b.abs().sum() > 0) for b in lora_b)  # B starts random, not zero
    module = wrapped.encoder.base_model.model.encoder.layer[0].attention.self.query
    assert module.scaling["default"] == pytest.approx(1 / 4)  # loralib's alpha 1 over r
    assert LoraSettings(preset="sam", rank=8).effective_preset() == "custom"
    with pytest.raises(MethodError, match="unknown LoRA preset"):
        LoraSettings(preset="big")


def test_lora_rejects_modules_the_encoder_lacks(model):
    with pytest.raises(ValueError, match="target_modules"):
        wrap_lora(model, LoraSettings(target_modules="qkv"))


# --- magnitude through the command line: mask -> start file -> stage 2 ---------------------------
def test_magnitude_start_file_carries_the_trained_weights_into_stage_2(tmp_path, glue_dir):
    from bayestune.cli import main
    from bayestune.delta import apply_delta
    from bayestune.tasks import build_task_model, load_task_data, prepare_task

    prep = prepare_task("cb", MINILM, tmp_path / "prep", glue_dir, 32)
    masks_dir, run_dir = tmp_path / "masks", tmp_path / "run"
    common = ["--task", "cb", "--model", MINILM, "--data", str(prep), "--seed", "1",
              "--batch-size", "4", "--device", "cpu"]
    assert main(["-q", "mask", "--method", "magnitude", *common, "--budgets", "0.005,0.02",
                 "--magnitude-steps", "3", "--magnitude-lr", "1e-3",
                 "--magnitude-warmup-epochs", "0", "--out-dir", str(masks_dir)]) == 0
    start, start_meta = files.load_model_state(masks_dir / "start.safetensors")
    mask, meta = files.load_mask(masks_dir / "p0.005.safetensors")
    # 3 steps at 1e-3 is not the SAM repo's 500 at 1e-4: no published row, and why
    assert meta["start"] and meta["published_as"] is None
    assert "magnitude_steps 3, published 500" in meta["published_differs"]
    assert (meta["per_tensor"], meta["keep_head"]) == (True, True)
    assert start_meta["task"] == "cb" and start_meta["seed"] == 1

    # The file holds exactly what the full phase trains, and the mask ranks its |theta|.
    model = build_task_model("cb", MINILM, 1)
    batches = load_task_data("cb", prep, 4, 1).train_epoch
    again = magnitude_start(model, batches, task_loss, 1, MethodConfig(
        magnitude_steps=3, magnitude_lr=1e-3, magnitude_warmup_epochs=0))
    assert all(torch.equal(start[n], again[n]) for n in again)
    ranked = masks_from_scores({n: t.abs() for n, t in start.items()}, [0.005], per_tensor=True,
                               keep_head=True)[0.005]
    assert all(torch.equal(mask[n], ranked[n]) for n in mask)

    finetune = ["-q", "finetune", *common, "--mask", str(masks_dir / "p0.005.safetensors"),
                "--max-steps", "2", "--eval-every", "2", "--out-dir", str(run_dir)]
    assert main(finetune) == 2  # a magnitude mask without its start is refused
    assert main([*finetune, "--start", str(masks_dir / "start.safetensors")]) == 0
    metrics = files.read_json(run_dir / "metrics.json")
    assert metrics["mask_fraction"] < 0.03 and metrics["published_as"] is None
    assert "stage-2 lr 0.001, published 0.0001" in metrics["published_differs"]
    assert metrics["changed_fraction"] > 0.5 and metrics["trainable_fraction"] > 0.5
    # The tuned model is the start file where the mask is off: training went on from there.
    tuned = build_task_model("cb", MINILM, 1)
    delta, _ = files.load_delta(run_dir / "delta.safetensors")
    apply_delta(tuned, delta)
    for name, param in tuned.named_parameters():
        frozen = ~mask[name]
        assert torch.equal(param.detach()[frozen], start[name][frozen]), name
