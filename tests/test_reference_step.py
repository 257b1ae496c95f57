"""The ``reference`` preset step for step against a transcription of the authors' equations.

The transcription below is written from the authors' code (my_jiant_runner.py run_train_step,
my_sampler.py, my_model_setup.py create_optimizer, jiant's configurator and metarunner,
transformers 3/4 AdamW, torch's Adam): plain loops over the parameters, its own AdamW and Adam,
jiant's schedule, the noise, lambda's gradient at the clamp and the moment bookkeeping. Both
sides use the same noise draws: the sampler's noise source is replaced by one that records
what it hands out, and the transcription reads the same draws back.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from bayestune.sampler import Sampler, sample_scales, sampler_config
from bayestune.tasks.base import TaskData

# The settings of the test run: 60 steps crossing theta's warm-up ramp (8 steps), the plain
# fine-tuning phase (counter < W), burn-in (W <= counter < B) and sampling every T from B.
W, B, T, STEPS = 10, 25, 5, 60
N, ALPHA, BETA, FLOOR, LR_THETA, LR_LAMBDA, LAMBDA_INIT = 1e3, 0.01, 100.0, 1e-8, 1e-3, 1e-2, 1e-4
EPOCHS, STEPS_PER_EPOCH, WARMUP_RATIO, WEIGHT_DECAY, ND = 20, 4, 0.1, 0.01, 1.0


class TinyNet(nn.Module):
    """Both weight-decay groups (weights; biases and a LayerNorm named as in BERT) and a
    parameter the loss never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.LayerNorm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.idle = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.LayerNorm(self.fc(x))))


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    if "x" not in batch:  # a task model (jiant's architecture) computes its own loss
        return model(batch).loss
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def batches(dtype: torch.dtype) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    return [{"x": torch.randn(6, 5, generator=g, dtype=dtype),
             "y": torch.randint(0, 3, (6,), generator=g)} for _ in range(STEPS_PER_EPOCH)]


def jiant_model() -> nn.Module:
    """A tiny BERT in jiant's architecture: its pooler (dense + tanh on the first token) feeds
    jiant's classification head, so the pooler is sampled and decayed like every weight.
    Dropout off, so that both sides see the same forward pass."""
    from transformers import BertConfig

    from bayestune.models.text import build_text_model_from_config

    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = build_text_model_from_config(config, "classification", 3, seed=0)
    # Attention's key bias adds q . b to every logit of a query's softmax alike: its gradient
    # is zero up to rounding, which Adam's normalisation blows up differently on either side.
    # It changes no output, so the test model goes without it.
    for layer in model.encoder.encoder.layer:
        layer.attention.self.key.bias = None
    return model


def token_batches(dtype: torch.dtype) -> list[dict]:
    del dtype  # token ids are integers whatever the model's dtype
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(1, 30, (6, 5), generator=g),
             "attention_mask": torch.ones(6, 5, dtype=torch.long),
             "labels": torch.randint(0, 3, (6,), generator=g)} for _ in range(STEPS_PER_EPOCH)]


MODELS = {"tinynet": (TinyNet, batches), "jiant-pooler": (jiant_model, token_batches)}


def reference_config(**changes):
    return sampler_config("reference", steps=STEPS, patience=0, warmup_steps=W, burnin_steps=B,
                          thinning=T, temperature=N, lr_theta=LR_THETA,
                          schedule_epochs=EPOCHS, **changes)


# --- the transcription ------------------------------------------------------------------------
class AuthorsStage1:
    """The authors' stage-1 step, written out per parameter."""

    def __init__(self, model: nn.Module, draws: dict) -> None:
        self.model, self.draws = model, draws
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.zero = [p.detach().clone() for p in self.params]              # runner.zero
        self.lamb = [torch.full_like(p, LAMBDA_INIT) for p in self.params]  # sampler.lamb_
        no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
        self.decay = [0.0 if any(nd in n for nd in no_decay) else WEIGHT_DECAY
                      for n in self.names]
        self.adamw = [None] * len(self.params)   # (step, exp_avg, exp_avg_sq) per parameter
        self.adam = [None] * len(self.params)    # lambda's Adam state per tensor
        self.bs_step = 0
        self.t_total = EPOCHS * STEPS_PER_EPOCH             # jiant: epochs x ceil(n / batch)
        self.warmup = int(self.t_total * WARMUP_RATIO)
        self.scheduler_step = 0                              # LambdaLR's last_epoch
        self.mom1 = self.mom2 = None
        self.cnt = 0
        self.samples: list[torch.Tensor] = []

    def lr(self) -> float:  # transformers' get_linear_schedule_with_warmup
        k = self.scheduler_step
        if k < self.warmup:
            return LR_THETA * (k / max(1, self.warmup))
        return LR_THETA * max(0.0, (self.t_total - k) / max(1, self.t_total - self.warmup))

    def step(self, step_index: int, batch: dict) -> None:
        for p in self.params:
            p.grad = None
        loss_fn(self.model, batch).backward()
        # complex_backpropagate: clip_grad_norm_(model.parameters(), 1.0)
        total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in self.params
                              if p.grad is not None))
        coef = min(1.0, 1.0 / (total + 1e-6))
        with torch.no_grad():
            grads = [p.grad * coef if p.grad is not None else None for p in self.params]
            self.bs_step += 1
            lr = self.lr()
            if not self.bs_step < W:
                lamb_layers = [lam.clamp(min=FLOOR) for lam in self.lamb]
                if self.bs_step == B:
                    vec = torch.cat([lam.reshape(-1) for lam in lamb_layers])
                    self.mom1, self.mom2, self.cnt = vec * 1.0, vec ** 2, 1
                    self.samples.append(vec.double())
                grad_lamb = [-((ALPHA - 1) / lam - BETA) / N for lam in lamb_layers]
                for i, (p, z) in enumerate(zip(self.params, self.zero, strict=True)):
                    if lr > 0 and grads[i] is not None:
                        xi = self.draws[(step_index, "theta", i)]
                        grads[i] = grads[i] + math.sqrt(2 / (N * lr)) * xi * ND
                    lamb = lamb_layers[i]
                    grad_lamb[i] = grad_lamb[i] + -1 * ((p - z).abs() / lamb ** 2 - 1 / lamb) / N
                    if grads[i] is not None:
                        grads[i] = grads[i] + -(-torch.sign(p - z) / lamb) / N
                for i in range(len(lamb_layers)):
                    xi = self.draws[(step_index, "lambda", i)]
                    grad_lamb[i] = grad_lamb[i] + math.sqrt(2 / (N * LR_LAMBDA)) * xi * ND
                if self.cnt > 0 and self.bs_step % T == 0:
                    vec = torch.cat([lam.reshape(-1) for lam in lamb_layers])
                    self.mom1 = (vec + self.cnt * self.mom1) / (self.cnt + 1)
                    self.mom2 = (vec ** 2 + self.cnt * self.mom2) / (self.cnt + 1)
                    self.cnt += 1
                    self.samples.append(vec.double())
                for i, g in enumerate(grad_lamb):
                    self.lamb[i] = self._adam(i, self.lamb[i], g)
            for i, p in enumerate(self.params):
                if grads[i] is not None:
                    p.copy_(self._adamw(i, p, grads[i], lr))
            self.scheduler_step += 1

    def _adam(self, i: int, lam: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """torch.optim.Adam with its defaults (betas 0.9, 0.999; eps 1e-8)."""
        b1, b2, eps = 0.9, 0.999, 1e-8
        t, m, v = self.adam[i] or (0, torch.zeros_like(lam), torch.zeros_like(lam))
        t, m, v = t + 1, b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        self.adam[i] = (t, m, v)
        denom = v.sqrt() / math.sqrt(1 - b2 ** t) + eps
        return lam - LR_LAMBDA / (1 - b1 ** t) * m / denom

    def _adamw(self, i: int, p: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
        """transformers.AdamW (eps 1e-8 from jiant), decay after the Adam step."""
        b1, b2, eps = 0.9, 0.999, 1e-8
        t, m, v = self.adamw[i] or (0, torch.zeros_like(p), torch.zeros_like(p))
        t, m, v = t + 1, b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        self.adamw[i] = (t, m, v)
        step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        p = p - step_size * m / (v.sqrt() + eps)
        return p - lr * self.decay[i] * p


# --- the test ---------------------------------------------------------------------------------
# The text model runs in float64 only: near the floor lambda moves by |theta - theta0| /
# lambda^2, which turns float32's different summation orders in a transformer's kernels into
# relative differences above 1e-4; in float64 the two sides agree to 1e-9.
CASES = [("tinynet", torch.float64, 1e-9), ("tinynet", torch.float32, 1e-4),
         ("jiant-pooler", torch.float64, 1e-9)]


@pytest.mark.parametrize(("kind", "dtype", "rtol"), CASES)
def test_reference_preset_is_the_authors_step_for_step(dtype, rtol, kind):
    make_model, make_batches = MODELS[kind]
    torch.manual_seed(0)
    model = make_model().to(dtype)
    authors = AuthorsStage1(copy.deepcopy(model), draws := {})
    gen = torch.Generator().manual_seed(99)
    sampler: Sampler | None = None

    def noise_fn(kind: str, index: int, like: torch.Tensor) -> torch.Tensor:
        xi = torch.randn(like.shape, generator=gen, dtype=like.dtype)
        draws[(sampler.step, kind, index)] = xi
        return xi

    config = reference_config(variance=True)
    sampler = Sampler(model, loss_fn, config, seed=0, device=torch.device("cpu"),
                      steps_per_epoch=STEPS_PER_EPOCH, noise_fn=noise_fn)
    data = make_batches(dtype)
    at_floor = 0
    for k in range(STEPS):
        sampler.advance(data[k % STEPS_PER_EPOCH])
        authors.step(k, data[k % STEPS_PER_EPOCH])
        for name, ours, theirs in zip(authors.names, sampler.params, authors.params, strict=True):
            torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=rtol, atol=0,
                                       msg=lambda m, k=k, name=name: f"step {k} {name}: {m}")
        for lam, theirs in zip(sampler.lams, authors.lamb, strict=True):
            torch.testing.assert_close(lam.detach(), theirs, rtol=rtol, atol=0)
        assert sampler.count == authors.cnt, k
        if authors.cnt:
            torch.testing.assert_close(sampler.stats.region(0).double(), authors.mom1.double(),
                                       rtol=1e-5, atol=0)
        at_floor += int((sampler.lam_flat <= FLOOR).sum())
        if k + 1 < W:  # plain fine-tuning: lambda untouched
            assert (sampler.lam_flat == LAMBDA_INIT).all()

    # the run crossed every phase: B counted twice, then every T; lambdas hit the floor and
    # came back (their clamped gradient is what moved them); the ramp went up and down
    assert authors.cnt == 1 + len(range(B, STEPS + 1, T)) == 9
    assert at_floor > 0 and (sampler.lam_flat > FLOOR).any()
    assert authors.warmup == 8 and 0 < authors.lr() < LR_THETA
    if kind == "tinynet":
        # theta moved where a gradient reached it and not where none did (idle); idle's lambda
        # moved
        idle = authors.names.index("idle")
        assert torch.equal(sampler.params[idle].detach(), authors.zero[idle])
        assert not (sampler.lams[idle] == LAMBDA_INIT).all()
    else:
        # the pooler is sampled like every encoder weight: it moved, with a lambda of its own
        pooler = authors.names.index("encoder.pooler.dense.weight")
        assert not torch.equal(sampler.params[pooler].detach(), authors.zero[pooler])
        assert authors.decay[pooler] == WEIGHT_DECAY
    # the variance of the samples, as the authors compute it at the end (B counted twice)
    samples = torch.stack(authors.samples)
    mom1, mom2, cnt = samples.mean(0), samples.pow(2).mean(0), len(authors.samples)
    authors_var = cnt / (cnt - 1) * (mom2 - mom1 ** 2)
    result = sampler.result()
    ours_var = torch.cat([v.reshape(-1) for v in result.var.values()]).double()
    torch.testing.assert_close(ours_var, authors_var, rtol=1e-3, atol=1e-12)
    sampler.close()


# --- the length rule --------------------------------------------------------------------------
def tiny_data() -> TaskData:
    g = torch.Generator().manual_seed(3)
    rows = [{"x": torch.randn(5, generator=g), "y": torch.randint(0, 3, (), generator=g)}
            for _ in range(20)]
    loader = DataLoader(rows, batch_size=4, shuffle=True, generator=torch.Generator())
    return TaskData(train=loader, val=loader, test=loader, seed=1)


def run_rule(scores: list[float], **changes):
    calls: list[int] = []

    def validate(model: nn.Module) -> float:
        calls.append(1)
        return scores[min(len(calls), len(scores)) - 1]

    settings = dict(steps=0, min_steps=30, patience=3, eval_every=5, warmup_steps=4,
                    burnin_steps=8, thinning=2, temperature=1e3, schedule_epochs=1000)
    config = sampler_config("reference", **{**settings, **changes})
    torch.manual_seed(0)
    data = tiny_data()
    result = sample_scales(TinyNet(), lambda e: ({"x": b["x"], "y": b["y"]}
                                                 for b in data.train_epoch(e)),
                           loss_fn, config, seed=2, device="cpu", progress=False,
                           steps_per_epoch=len(data.train), validate=validate)
    return result, len(calls)


def test_length_rule_runs_at_least_min_steps():
    # scores only get worse: patience is used up after the 4th evaluation (step 19), but the
    # run goes on to the first step past min_steps (jiant validates after steps 4, 9, ...)
    result, calls = run_rule([0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    assert result.steps == 31 and calls == 6 and result.best_val == 0.5


def test_length_rule_stops_after_patience_evaluations_without_improvement():
    # better and better until the 6th evaluation (step 29), then three evaluations no better
    result, calls = run_rule([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.55, 0.6, 0.9])
    assert result.steps == 44 and calls == 9 and result.best_val == 0.6
    # the scale file holds the running mean at the stop: that of a fixed run of that length
    # (validation cannot touch the chain: it runs on a fork of the RNG)
    fixed, _ = run_rule([0.0], patience=0, steps=44)
    assert fixed.n_samples == result.n_samples == 1 + len(range(8, 45, 2))
    for name in result.mean:
        assert torch.equal(result.mean[name], fixed.mean[name]), name
