"""Stage 1: phases, the known answer, resuming, divergence, config checks, the scale file."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from bayestune import files
from bayestune import running_stats as running_stats_module
from bayestune.noise import BlockNoise
from bayestune.running_stats import RunningStats
from bayestune.sampler import (
    Sampler,
    SamplerConfig,
    SamplerConfigError,
    SamplingDivergedError,
    preset_overrides,
    sample_scales,
    sampler_config,
    write_scale_file,
)
from bayestune.sampler import chain as sampler_module
from bayestune.tasks.base import TaskData


# --- a tiny classifier with dropout, fed by a real shuffling DataLoader -----------------------
class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(12, 3)
        self.idle = nn.Parameter(torch.zeros(4))  # never reaches the loss: no data gradient

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head(self.encoder(batch["x"]))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def ce_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch), batch["y"])


def tiny_data(n: int = 36, batch_size: int = 8) -> TaskData:
    g = torch.Generator().manual_seed(123)
    rows = [{"x": torch.randn(6, generator=g), "y": torch.randint(0, 3, (), generator=g)}
            for _ in range(n)]
    loader = DataLoader(rows, batch_size=batch_size, shuffle=True, generator=torch.Generator())
    return TaskData(train=loader, val=loader, test=loader, seed=7)


def small_config(preset: str = "exact", **changes) -> SamplerConfig:
    base = dict(steps=40, warmup_steps=8, burnin_steps=20, thinning=4, temperature=1e4,
                lambda_init=1e-3, lr_theta=1e-2, lr_lambda=1e-3, checkpoint_every=5)
    if preset == "reference":  # a fixed length, the jiant ramp over 20 epochs of 5 batches
        base.update(patience=0, schedule_epochs=20)
    return sampler_config(preset, **{**base, **changes})


class Killed(Exception):
    pass


def killed_after(batches, n_batches: int):
    """A batch stream that dies when asked for batch number ``n_batches + 1``."""
    drawn = 0

    def stream(epoch):
        nonlocal drawn
        for batch in batches(epoch):
            if drawn == n_batches:
                raise Killed
            drawn += 1
            yield batch
    return stream


def run(config, model=None, data=None, **kwargs):
    model = model if model is not None else tiny_net()
    data = data if data is not None else tiny_data()
    kwargs = {"seed": 3, "device": "cpu", "progress": False, "steps_per_epoch": 5, **kwargs}
    return sample_scales(model, data.train_epoch, ce_loss, config, **kwargs)


def val_score(model: nn.Module) -> float:
    """A deterministic validation score: minus the loss on a fixed batch, dropout off."""
    g = torch.Generator().manual_seed(9)
    batch = {"x": torch.randn(16, 6, generator=g), "y": torch.randint(0, 3, (16,), generator=g)}
    model.eval()
    with torch.no_grad():
        return -float(ce_loss(model, {k: v.to(next(model.parameters()).device)
                                      for k, v in batch.items()}))


# A GPU runs the same tests where one is visible (the CUDA sampler keeps whole tensors, its
# statistics in memory and its own RNG state in checkpoints).
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs a GPU"))


# --- the known answer -------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_known_answer_only_the_moved_coordinates_get_large_scales(device):
    # y = X w*, where w* differs from the pretrained w0 on 3 of 200 coordinates only.
    dim, n, moved = 200, 512, torch.tensor([5, 77, 150])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    w0 = 0.1 * torch.randn(dim, generator=g)
    w_star = w0.clone()
    w_star[moved] += torch.tensor([1.0, -0.8, 0.6])
    y = x @ w_star

    def batches(epoch):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n, 64):
            yield {"x": x[order[i:i + 64]], "y": y[order[i:i + 64]]}

    def mse(model, batch):
        return 0.5 * (model(batch["x"]).squeeze(-1) - batch["y"]).square().mean()

    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0)
    config = SamplerConfig(steps=1200, warmup_steps=400, burnin_steps=700, thinning=10,
                           temperature=1e3, lambda_init=1e-2, lr_theta=3e-3, lr_lambda=1e-3,
                           noise_discount=0.3)
    result = sample_scales(model, batches, mse, config, seed=0, device=device, progress=False)
    lam = result.mean["weight"][0].cpu()
    rest = torch.ones(dim, dtype=torch.bool)
    rest[moved] = False
    assert set(lam.topk(3).indices.tolist()) == set(moved.tolist())
    assert lam[moved].min() >= 10 * lam[rest].mean()
    assert result.n_samples == config.n_samples == 50


# --- both variants, the result's shape --------------------------------------------------------
@pytest.mark.parametrize("variant", ["adamw", "sgld"])
def test_both_variants_give_one_finite_scale_per_parameter(variant):
    config = small_config(variant=variant, lr_theta=1e-2 if variant == "adamw" else 1e-1,
                          lr_lambda=1e-3 if variant == "adamw" else 1e-6, variance=True)
    model = tiny_net()
    result = run(config, model=model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert list(result.mean) == list(shapes) == list(result.var)
    for name, shape in shapes.items():
        assert result.mean[name].shape == shape and result.var[name].shape == shape
        assert torch.isfinite(result.mean[name]).all() and (result.mean[name] >= 1e-8).all()
        assert (result.var[name] >= 0).all()
    assert result.n_samples == config.n_samples == 5 and result.steps == 40
    # the idle parameter has no data gradient but still feels prior and noise under SGLD
    assert not torch.equal(model.idle.detach(), torch.zeros(4))


# --- one SGLD step, term by term ---------------------------------------------------------------
def test_one_plain_sgld_step_is_the_formula():
    """x <- x - eta (clip(grad L) + grad U_prior + discount sqrt(2 / (N eta)) xi) for theta and
    lambda: the noise rides on the gradient (so it enters with a minus sign, which is the same
    in distribution), xi drawn from the sampler's own seeded generator, theta first."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    batch = {"x": torch.randn(4, 5), "y": torch.randn(4, 3)}

    def mse(m, b):
        return 10.0 * (m(b["x"]) - b["y"]).square().mean()  # large: the clip is active

    config = SamplerConfig(steps=2, warmup_steps=0, burnin_steps=1, thinning=1, variant="sgld",
                           temperature=50.0, lr_theta=1e-2, lr_lambda=1e-3, lambda_init=0.3,
                           noise_discount=0.5, grad_clip=0.1)
    sampler = Sampler(model, mse, config, seed=11, device=torch.device("cpu"))
    sampler.theta0_flat.add_(0.2 * torch.randn(sampler.theta0_flat.shape))  # so theta != theta0
    sampler.lam_flat.data[::3] = -1.0                                         # some below floor
    theta, theta0 = sampler.layout.flatten(sampler.params), sampler.theta0_flat.clone()
    lam = sampler.lam_flat.detach().clone()

    data_grads = torch.autograd.grad(mse(model, batch), list(model.parameters()))
    norm = torch.cat([g.reshape(-1) for g in data_grads]).norm()
    clipped = torch.cat([g.reshape(-1) for g in data_grads]) * (0.1 / (norm + 1e-6))
    xi = torch.Generator().manual_seed(11 ^ 0x5EED5EED)
    xi_theta, xi_lam = torch.randn(theta.shape, generator=xi), torch.randn(lam.shape, generator=xi)
    prior = config.prior()

    sampler.train_step(batch)
    want_theta = theta - 1e-2 * (clipped + prior.grad_theta(theta, theta0, lam)
                                 + 0.5 * (2 / (50.0 * 1e-2)) ** 0.5 * xi_theta)
    want_lam = lam - 1e-3 * (prior.grad_lambda(theta, theta0, lam)
                             + 0.5 * (2 / (50.0 * 1e-3)) ** 0.5 * xi_lam)
    torch.testing.assert_close(sampler.layout.flatten(sampler.params), want_theta)
    torch.testing.assert_close(sampler.lam_flat.detach(), want_lam)


def test_gpu_layout_gives_the_cpu_answer_without_noise(monkeypatch):
    # A GPU takes whole tensors in one block; the CPU cuts them into cache-sized pieces. The
    # maths must not notice (only the noise stream depends on the blocks; vectorised kernels
    # round the tails of different lengths differently, hence 1e-5).
    config = small_config(noise_discount=0.0)
    monkeypatch.setattr(sampler_module, "CPU_PIECE", 5)   # the tiny net has 127 scalars
    monkeypatch.setattr(sampler_module, "CPU_BLOCK", 16)
    pieces = run(config)
    monkeypatch.setattr(sampler_module, "CPU_PIECE", None)
    for block in (None, 40):  # whole tensors in one block; in several, each lambda's own Adam
        monkeypatch.setattr(sampler_module, "CPU_BLOCK", block)
        whole = run(config)
        for name in pieces.mean:
            torch.testing.assert_close(whole.mean[name], pieces.mean[name], rtol=1e-5, atol=0)


def test_block_loop_leaves_the_thread_count_as_it_found_it():
    threads = torch.get_num_threads()
    run(small_config(steps=12, burnin_steps=10))
    assert torch.get_num_threads() == threads


def test_noise_drawn_ahead_on_a_spare_core_is_the_serial_chain(monkeypatch):
    # With a second thread a worker draws each block's noise one block early; one thread makes
    # every draw, in the same order, so the chain is the one-thread chain bit for bit.
    monkeypatch.setattr(sampler_module, "CPU_PIECE", 5)   # a block per piece of 5 scalars
    monkeypatch.setattr(sampler_module, "CPU_BLOCK", 5)
    config = small_config()
    serial = run(config)
    calls = []
    original = BlockNoise._ahead
    monkeypatch.setattr(BlockNoise, "_ahead", lambda self: calls.append(1) or original(self))
    torch.set_num_threads(2)
    ahead = run(config)
    assert len(calls) == config.steps - config.warmup_steps  # every SGLD step went ahead
    assert ahead.n_samples == serial.n_samples == 5
    for name in serial.mean:
        assert torch.equal(ahead.mean[name], serial.mean[name]), name


@pytest.mark.parametrize("variant", ["adamw", "sgld"])
def test_per_tensor_step_gives_the_fused_answer_without_noise(monkeypatch, variant):
    # The per-tensor step (the authors' order of operations) with the exact settings: the same
    # chain as the fused step, up to rounding (the noise streams differ, so without noise).
    config = small_config(noise_discount=0.0, variant=variant, weight_decay=0.0,
                          lr_theta=1e-2 if variant == "adamw" else 1e-1)
    fused = run(config)
    monkeypatch.setattr(SamplerConfig, "fused_step", property(lambda self: False))
    per_tensor = run(config)
    assert per_tensor.n_samples == fused.n_samples == 5
    for name in fused.mean:
        torch.testing.assert_close(per_tensor.mean[name], fused.mean[name], rtol=1e-4, atol=0)


# --- phases -----------------------------------------------------------------------------------
def _checkpoint_after(steps_done, config, tmp_path):
    path = tmp_path / f"after{steps_done}.pt"
    data = tiny_data()
    with pytest.raises(Killed):
        sample_scales(tiny_net(), killed_after(data.train_epoch, steps_done), ce_loss, config,
                      seed=3, device="cpu", checkpoint_path=path, progress=False)
    return files.load_checkpoint(path)


def test_warmup_fine_tunes_theta_and_keeps_lambda_fixed(tmp_path):
    config = small_config(checkpoint_every=1)
    at_w = _checkpoint_after(config.warmup_steps, config, tmp_path)
    assert at_w["step"] == config.warmup_steps
    assert at_w["lam"] is None                # still lambda_init everywhere: not stored
    assert all(opt["state"] == {} for opt in at_w["opt_lam"])  # nor has its optimiser state
    theta = torch.cat([at_w["model"][n].reshape(-1) for n in at_w["names"]])
    theta0 = torch.cat([p.detach().reshape(-1) for p in tiny_net().parameters()])
    assert not torch.equal(theta, theta0)     # plain fine-tuning happened
    assert at_w["count"] == 0 and at_w["stats"] == []
    after = _checkpoint_after(config.warmup_steps + 1, config, tmp_path)
    assert not torch.equal(after["lam"], torch.full_like(after["lam"], config.lambda_init))


def test_samples_start_at_burnin_every_thinning_steps(tmp_path):
    config = small_config(checkpoint_every=1)
    counts = [_checkpoint_after(k, config, tmp_path)["count"]
              for k in (config.burnin_steps, config.burnin_steps + 1, config.burnin_steps + 4,
                        config.burnin_steps + 5)]
    assert counts == [0, 1, 1, 2]


def test_running_mean_and_variance_count_each_sample_once():
    model = tiny_net()
    sampler = Sampler(model, ce_loss, small_config(variance=True), seed=0,
                      device=torch.device("cpu"))
    values = [1e-3, 2e-3, 4e-3, 1e-9]    # the last one is below the floor: recorded as 1e-8
    for v in values:
        sampler.lam_flat.data.fill_(v)
        sampler.record_sample()
    result = sampler.result()
    used = torch.tensor([max(v, 1e-8) for v in values], dtype=torch.float64)
    assert result.n_samples == 4
    for name in result.mean:
        torch.testing.assert_close(result.mean[name].double(),
                                   torch.full_like(result.mean[name], used.mean()).double())
        torch.testing.assert_close(result.var[name].double(),
                                   torch.full_like(result.var[name], used.var()).double(),
                                   rtol=1e-4, atol=0)


# Measured in a fresh interpreter: in this one, earlier tests' freed pages are still resident
# and a new buffer may reuse them without the RSS showing it.
_RSS_GROWTH_SCRIPT = """
import sys, torch
from bayestune import running_stats
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
numel = 1 << 22
running_stats.STATS_BLOCK = 1 << 16
samples = [torch.rand(numel) for _ in range(3)]
warm = running_stats.RunningStats(10, in_memory=False)
warm.add(lambda start, stop: torch.rand(stop - start))
before = rss()
stats = running_stats.RunningStats(numel, in_memory=sys.argv[1] == "memory")
for x in samples:
    stats.add(lambda start, stop, x=x: x[start:stop].clone())
print(rss() - before)
"""


def _rss_growth(where: str) -> int:
    done = subprocess.run([sys.executable, "-c", _RSS_GROWTH_SCRIPT, where], check=True,
                          capture_output=True, text=True, timeout=300)
    return int(done.stdout.split()[-1])


def test_running_statistics_on_disk_stay_out_of_the_process():
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    # 16 MiB per region, 32 MiB in all: the file keeps them out of the RSS, memory does not
    disk_growth, memory_growth = _rss_growth("disk"), _rss_growth("memory")
    assert disk_growth < (8 << 20) < (24 << 20) < memory_growth, (disk_growth, memory_growth)


def test_running_statistics_on_disk_match_memory(monkeypatch):
    numel = 1 << 20
    monkeypatch.setattr(running_stats_module, "STATS_BLOCK", 1 << 16)
    samples = [torch.rand(numel) for _ in range(3)]

    def fill(in_memory: bool) -> RunningStats:
        stats = RunningStats(numel, in_memory=in_memory)
        for x in samples:
            stats.add(lambda start, stop, x=x: x[start:stop].clone())
        return stats

    on_disk, in_memory = fill(False), fill(True)
    stacked = torch.stack(samples).double()
    for k, want in enumerate((stacked.mean(0), stacked.var(0) * 2)):  # M2 = var * (n - 1)
        assert torch.equal(on_disk.region(k), in_memory.region(k))
        torch.testing.assert_close(on_disk.region(k).double(), want, rtol=1e-4, atol=1e-6)
    # checkpoint round trip through raw bytes, from memory into a file and back
    restored = RunningStats(numel, in_memory=False)
    for k in (0, 1):
        raw = io.BytesIO()
        in_memory.writer(k)(raw)
        assert raw.tell() == 4 * numel
        raw.seek(0)
        restored.load(k, raw, Path("ckpt"))
        assert torch.equal(restored.region(k), on_disk.region(k))
    with pytest.raises(files.FileFormatError, match="shorter"):
        restored.load(0, io.BytesIO(b"\0" * 12), Path("ckpt"))
    for stats in (on_disk, in_memory, restored):
        stats.close()


# --- resuming ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["exact", "cold", "reference"])
@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("killed_at", [3, 23, 37])  # before any checkpoint, burn-in, sampling
def test_killed_and_resumed_run_gives_the_same_scale_file(tmp_path, killed_at, device, preset):
    config = small_config(preset, variance=True)
    whole = run(config, device=device)
    path = tmp_path / "ckpt.pt"
    data = tiny_data()
    with pytest.raises(Killed):
        sample_scales(tiny_net(), killed_after(data.train_epoch, killed_at), ce_loss, config,
                      seed=3, device=device, checkpoint_path=path, progress=False,
                      steps_per_epoch=5)
    assert path.exists() == (killed_at >= config.checkpoint_every)
    torch.manual_seed(12345)  # the global RNG state of the new process is whatever it is
    if device == "cuda":
        torch.cuda.manual_seed_all(12345)
    resumed = run(config, model=tiny_net(), data=tiny_data(), checkpoint_path=path,
                  device=device)
    assert resumed.n_samples == whole.n_samples
    for name in whole.mean:
        assert torch.equal(resumed.mean[name], whole.mean[name]), name
        assert torch.equal(resumed.var[name], whole.var[name]), name
    for out, result in (("a", whole), ("b", resumed)):
        write_scale_file(tmp_path / f"{out}.safetensors", result, config, seed=3, model_id="tiny")
    assert ((tmp_path / "a.safetensors").read_bytes()
            == (tmp_path / "b.safetensors").read_bytes())


def test_killed_run_under_the_length_rule_resumes_to_the_same_stop(tmp_path):
    config = small_config("reference", steps=0, min_steps=24, patience=2, eval_every=4)
    whole = run(config, validate=val_score)
    assert 24 < whole.steps < 200 and whole.best_val is not None
    path = tmp_path / "ckpt.pt"
    data = tiny_data()
    with pytest.raises(Killed):
        sample_scales(tiny_net(), killed_after(data.train_epoch, 23), ce_loss, config, seed=3,
                      device="cpu", checkpoint_path=path, progress=False, steps_per_epoch=5,
                      validate=val_score)
    torch.manual_seed(12345)
    resumed = run(config, checkpoint_path=path, validate=val_score)
    assert (resumed.steps, resumed.n_samples, resumed.best_val) == (
        whole.steps, whole.n_samples, whole.best_val)
    assert all(torch.equal(resumed.mean[n], whole.mean[n]) for n in whole.mean)
    again = run(config, checkpoint_path=path, data=_EmptyEpochs(), validate=val_score)
    assert again.steps == whole.steps  # a stopped run's checkpoint needs no further batch
    with pytest.raises(SamplerConfigError, match="steps per epoch"):
        run(config, checkpoint_path=path, validate=val_score, steps_per_epoch=6)
    with pytest.raises(SamplerConfigError, match="validation callback"):
        run(config)


def test_checkpoint_carries_the_statistics_in_one_file(tmp_path):
    config = small_config()
    path = tmp_path / "ckpt.pt"
    data = tiny_data()
    with pytest.raises(Killed):
        sample_scales(tiny_net(), killed_after(data.train_epoch, 31), ce_loss, config, seed=3,
                      device="cpu", checkpoint_path=path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # the scratch file is gone
    state = files.load_checkpoint(path)
    assert state["count"] == 3 and state["stats"] == ["running_mean"]  # no M2 unless asked
    with files.open_checkpoint_attachment(path, state["stats"][0]) as stream:
        mean = torch.frombuffer(bytearray(stream.read()), dtype=torch.float32)
    assert mean.numel() == 127 and (mean >= config.lambda_floor).all()
    files.save_checkpoint(path, state)  # the same state without its attachments
    with pytest.raises(files.FileFormatError, match="no attachment 'running_mean'"):
        run(config, checkpoint_path=path)
    fresh = tmp_path / "new" / "ckpt.pt"  # the scratch file's folder need not exist yet
    assert run(small_config(checkpoint_every=0), checkpoint_path=fresh).n_samples == 5
    assert [p.name for p in fresh.parent.iterdir()] == ["ckpt.pt"]


def test_finished_checkpoint_returns_at_once_and_other_settings_are_refused(tmp_path,
                                                                          monkeypatch):
    config = small_config()
    path = tmp_path / "ckpt.pt"
    first = run(config, checkpoint_path=path)
    again = run(config, checkpoint_path=path, data=_EmptyEpochs())  # no batch is needed
    assert all(torch.equal(first.mean[n], again.mean[n]) for n in first.mean)
    with pytest.raises(SamplerConfigError, match="temperature"):
        run(dataclasses.replace(config, temperature=1e5), checkpoint_path=path)
    with pytest.raises(SamplerConfigError, match="seed 3"):
        run(config, checkpoint_path=path, seed=4)
    with monkeypatch.context() as patch:  # as if written on a GPU (whole-tensor pieces)
        patch.setattr(sampler_module, "CPU_PIECE", 7)
        with pytest.raises(SamplerConfigError, match="another device type"):
            run(config, checkpoint_path=path)


class _EmptyEpochs:
    def train_epoch(self, epoch):
        return iter(())


def test_empty_batch_stream_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        run(small_config(), data=_EmptyEpochs())


# --- divergence -------------------------------------------------------------------------------
def _nan_loss(model):
    return torch.tensor(float("nan"))


def _nan_head(model):
    model.head.weight.data.fill_(float("nan"))


def _inf_idle(model):  # a parameter the loss never sees: only lambda can catch it
    model.idle.data.fill_(float("inf"))


@pytest.mark.parametrize("poison,name,what", [
    (_nan_loss, None, "loss"), (_nan_head, "head.weight", "loss"), (_inf_idle, "idle", "lambda")])
def test_nan_stops_the_run_naming_step_and_parameter(poison, name, what):
    calls = 0

    def loss_fn(model, batch):
        nonlocal calls
        calls += 1
        if calls == 13:                       # step 12, after warm-up
            nan = poison(model)
            if nan is not None:
                return ce_loss(model, batch) * nan
        return ce_loss(model, batch)

    with pytest.raises(SamplingDivergedError, match="step 12") as info:
        sample_scales(tiny_net(), tiny_data().train_epoch, loss_fn, small_config(grad_clip=0.0),
                      seed=0, device="cpu", progress=False)
    assert isinstance(info.value, RuntimeError)
    assert info.value.step == 12 and info.value.name == name
    assert what in str(info.value) and (name is None or name in str(info.value))


# --- config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("changes,message", [
    ({"warmup_steps": 30, "burnin_steps": 20}, "warmup_steps <= burnin_steps"),
    ({"burnin_steps": 40}, "leaves no lambda sample"),
    ({"thinning": 0}, "thinning"),
    ({"temperature": 0.0}, "temperature"),
    ({"lambda_init": -1.0}, "lambda_init"),
    ({"noise_discount": -0.5}, "noise_discount"),
    ({"variant": "hmc"}, "variant"),
    ({"variant": "sgld", "weight_decay": 0.01}, "weight_decay"),
    ({"variant": "sgld", "schedule": "jiant"}, "schedule jiant"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
    ({"steps": 0}, "0 only with patience"),
    ({"steps": 0, "patience": 2, "min_steps": 10}, "run of 11 steps"),
    ({"schedule": "cosine"}, "schedule"),
    ({"sample_rule": "ours"}, "sample_rule"),
    ({"floor_gradient": "autograd"}, "floor_gradient"),
    ({"schedule_warmup": 1.0}, "schedule_warmup"),
    ({"eval_every": 0}, "eval_every"),
])
def test_bad_config_is_refused_with_the_field_named(changes, message):
    with pytest.raises(SamplerConfigError, match=message):
        small_config(**changes)


def test_defaults_are_the_exact_preset_and_reference_is_the_authors_command():
    config = SamplerConfig()
    assert config == sampler_config() == sampler_config("exact")
    assert (config.steps, config.warmup_steps, config.burnin_steps, config.thinning) == (
        20000, 10000, 12000, 100)
    assert config.n_samples == 80 and config.temperature == 1e12 and config.variant == "adamw"
    assert config.fused_step and (config.schedule, config.patience) == ("constant", 0)
    assert all(f.metadata.get("help") for f in dataclasses.fields(SamplerConfig))
    # the README's MRPC command: lr 1e-4 (10000 epochs, jiant's 10% warm-up), min 20000 steps,
    # eval every 500, patience 40, alp 0.01, bet 100, lamb_init 1e-4, lr_others 1e-2, N 1e12,
    # nd 1, burn-in 12000, thinning 100, warm-up 10000
    ref = sampler_config("reference")
    assert (ref.lr_theta, ref.schedule, ref.schedule_epochs, ref.schedule_warmup) == (
        1e-4, "jiant", 10000, 0.1)
    assert (ref.min_steps, ref.eval_every, ref.patience, ref.val_subset, ref.steps) == (
        20000, 500, 40, 500, 0)
    assert (ref.alpha, ref.beta, ref.lambda_init, ref.lr_lambda, ref.temperature) == (
        0.01, 100.0, 1e-4, 1e-2, 1e12)
    assert (ref.noise_discount, ref.burnin_steps, ref.thinning, ref.warmup_steps) == (
        1.0, 12000, 100, 10000)
    assert (ref.variant, ref.weight_decay, ref.floor_gradient, ref.sample_rule,
            ref.no_grad_params, ref.grad_clip) == ("hf-adamw", 0.01, "clamped", "authors",
                                                   "skip", 1.0)
    assert not ref.fused_step and ref.shortest_run == 20001
    cold = sampler_config("cold")
    assert (cold.noise_discount, cold.lr_lambda) == (0.0, 1e-4) and cold.fused_step


def test_reference_true_n_changes_only_lambdas_n():
    ref, true_n = sampler_config("reference"), sampler_config("reference-true-n")
    differing = {f.name for f in dataclasses.fields(SamplerConfig)
                 if getattr(ref, f.name) != getattr(true_n, f.name)}
    assert differing == {"preset", "lambda_temperature"}
    assert (ref.lambda_n(8551), true_n.lambda_n(8551)) == (1e12, 8551.0)
    assert sampler_config(lambda_temperature="250").lambda_n() == 250.0
    with pytest.raises(SamplerConfigError, match="needs the number of training examples"):
        true_n.prior()
    with pytest.raises(SamplerConfigError, match="lambda_temperature='many'"):
        sampler_config(lambda_temperature="many")
    # the sampler's lambda noise follows lambda's N, theta's keeps temperature (1e4)
    config = small_config(lambda_temperature="train-size")
    sampler = Sampler(tiny_net(), ce_loss, config, seed=0, device=torch.device("cpu"),
                      train_size=40)
    assert sampler.prior.n_lambda == 40.0
    assert sampler.noise_lam == pytest.approx((2.0 / (40 * 1e-3)) ** 0.5)
    assert sampler.noise_theta == pytest.approx((2.0 / (1e4 * 1e-2)) ** 0.5)
    # a whole run: the samples stay finite and differ from the same chain at N = 1e4 (Adam
    # normalises the step, so lambda's N changes its gradient-to-noise ratio, not its size)
    same = torch.cat([v.flatten() for v in run(small_config()).mean.values()])
    moved = torch.cat([v.flatten() for v in run(config, train_size=40).mean.values()])
    assert torch.isfinite(moved).all() and not torch.equal(moved, same)


def test_explicit_settings_override_the_preset_and_the_file_records_both(tmp_path):
    config = sampler_config("cold", lr_lambda=1e-3, steps=40, warmup_steps=8, burnin_steps=20,
                            thinning=4)
    assert (config.preset, config.noise_discount, config.lr_lambda) == ("cold", 0.0, 1e-3)
    assert preset_overrides(config) == ["burnin_steps", "lr_lambda", "steps", "thinning",
                                        "warmup_steps"]
    with pytest.raises(SamplerConfigError, match="unknown sampler preset 'paper'"):
        sampler_config("paper")
    with pytest.raises(SamplerConfigError, match="unknown sampler setting"):
        sampler_config("cold", lr=1e-3)
    result = run(config)
    write_scale_file(tmp_path / "s.safetensors", result, config, seed=3, model_id="tiny")
    _, meta = files.load_scales(tmp_path / "s.safetensors")
    assert meta["preset"] == "cold" and meta["overrides"] == preset_overrides(config)
    assert (meta["noise_discount"], meta["lr_lambda"]) == (0.0, 1e-3)


def test_command_line_flags_override_the_preset():
    from bayestune.cli import build_parser, sampler_config_from_args

    parser = build_parser()
    common = ["sample", "--task", "cb", "--model", "m", "--out", "s.safetensors"]
    args = parser.parse_args([*common, "--preset", "reference", "--min-steps", "30000",
                              "--no-autocast"])
    config = sampler_config_from_args(args)
    assert config == sampler_config("reference", min_steps=30000, autocast=False)
    assert sampler_config_from_args(parser.parse_args(common)) == SamplerConfig()
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--preset", "paper"])


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="no GPU"):
        run(small_config(), device="cuda")


# --- the scale file ---------------------------------------------------------------------------
def test_scale_file_holds_the_mean_and_the_run_settings(tmp_path):
    config = small_config()
    model = tiny_net()
    result = run(config, model=model)
    path = tmp_path / "scales.safetensors"
    write_scale_file(path, result, config, seed=3, model_id="tiny-net")
    scales, meta = files.load_scales(path)
    files.check_matches_model(scales, {n: p.shape for n, p in model.named_parameters()},
                              path, "scale")
    assert all(torch.equal(scales[n], result.mean[n]) for n in result.mean)
    assert meta["model_id"] == "tiny-net" and meta["seed"] == 3
    assert meta["n_samples"] == 5 and meta["steps"] == 40 and meta["temperature"] == 1e4
    assert meta["variant"] == "adamw" and "bayestune_version" in meta


# --- job logs ---------------------------------------------------------------------------------
def _log_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bayestune.sampler"
            and r.getMessage().startswith("stage 1 step")]


def test_log_lines_every_n_steps_with_phase_and_lambda(caplog):
    caplog.set_level("INFO", logger="bayestune.sampler")
    run(small_config(warmup_steps=10), log_every=10)
    lines = _log_lines(caplog)
    assert [line.split(":")[0] for line in lines] == [
        "stage 1 step 10/40 (warm-up)", "stage 1 step 20/40 (burn-in)",
        "stage 1 step 30/40 (sampling)", "stage 1 step 40/40 (sampling)"]
    # through warm-up lambda stays at lambda_init = 1e-3, far above the floor
    assert "lambda median 0.001 p99 0.001 max 0.001, at floor 0.0%" in lines[0]
    assert all("validation" not in line for line in lines)  # no length rule here
    assert all(float(line.split("loss ")[1].split(",")[0]) > 0 for line in lines)


def test_log_lines_carry_the_length_rules_scores(caplog):
    caplog.set_level("INFO", logger="bayestune.sampler")
    config = small_config("reference", steps=0, min_steps=24, patience=2, eval_every=4)
    result = run(config, validate=val_score, log_every=1000)
    lines = _log_lines(caplog)
    # only the validations (after steps 3, 7, ...: jiant's steps + 1) and the last step log
    evaluated = [int(line.split()[3].split("/")[0]) for line in lines if "validation" in line]
    assert evaluated == list(range(3, result.steps + 1, 4))
    best = [float(line.split("validation ")[1].split()[0]) for line in lines if "(best)" in line]
    assert best[-1] == pytest.approx(result.best_val, abs=1e-4)
    assert lines[-1].startswith(f"stage 1 step {result.steps}/")  # the last step, too


def test_lambda_summary_quantiles_floor_and_subset(monkeypatch):
    config = small_config()
    sampler = Sampler(tiny_net(), ce_loss, config, 0, torch.device("cpu"))
    lam = sampler.lam_flat
    with torch.no_grad():
        lam.copy_(torch.linspace(-1.0, 1.0, lam.numel()))
    exact = torch.quantile(lam.clamp_min(config.lambda_floor), torch.tensor([0.5, 0.99]))
    summary = sampler.lambda_summary()
    assert summary["median"] == pytest.approx(float(exact[0]))
    assert summary["p99"] == pytest.approx(float(exact[1]))
    assert summary["max"] == 1.0
    assert summary["at_floor"] == pytest.approx(int((lam <= 1e-8).sum()) / lam.numel())
    monkeypatch.setattr(sampler_module, "LOG_QUANTILE_ENTRIES", 16)  # a strided subset
    coarse = sampler.lambda_summary()
    assert coarse["p99"] == pytest.approx(float(exact[1]), abs=0.2)
    assert (coarse["max"], coarse["at_floor"]) == (summary["max"], summary["at_floor"])


# --- checkpoint size and the bf16 checkpoint ----------------------------------------------
class WideNet(TinyNet):
    """TinyNet with a wide hidden layer: its buffers, not pickling, make the checkpoint size."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 16384), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(16384, 3)


def wide_net() -> WideNet:
    torch.manual_seed(0)
    return WideNet()


def _killed_checkpoint(config, path, killed_at, net=wide_net):
    data = tiny_data()
    with pytest.raises(Killed):
        sample_scales(net(), killed_after(data.train_epoch, killed_at), ce_loss, config,
                      seed=3, device="cpu", checkpoint_path=path, progress=False,
                      steps_per_epoch=5)
    return path


@pytest.mark.parametrize(("precision", "warmup", "burnin", "sampling"), [
    ("fp32", 3.0, 6.0, 7.0), ("bf16", 1.5, 3.0, 3.5)])
def test_checkpoint_size_in_model_sizes(tmp_path, precision, warmup, burnin, sampling):
    # model, theta's 2 moments; + lambda and its 2 moments; + the running mean (halved in bf16)
    model_bytes = 4 * sum(p.numel() for p in wide_net().parameters())
    config = small_config(checkpoint_every=1, checkpoint_precision=precision)
    for killed_at, models in ((5, warmup), (15, burnin), (25, sampling)):
        path = _killed_checkpoint(config, tmp_path / f"{killed_at}.pt", killed_at)
        assert path.stat().st_size / model_bytes == pytest.approx(models, abs=0.05), killed_at


def test_bf16_checkpoint_rounds_each_value_once_and_resumes_close(tmp_path):
    exact = files.load_checkpoint(_killed_checkpoint(small_config(), tmp_path / "a.pt", 25))
    rounded_path = _killed_checkpoint(small_config(checkpoint_precision="bf16"),
                                      tmp_path / "b.pt", 25)
    rounded = files.load_checkpoint(rounded_path)
    close = {"rtol": 2.0 ** -8, "atol": 0.0}  # bf16 keeps 8 significant bits
    torch.testing.assert_close(rounded["lam"].float(), exact["lam"], **close)
    for mine, ours in zip([rounded["opt_theta"], *rounded["opt_lam"]],
                          [exact["opt_theta"], *exact["opt_lam"]], strict=True):
        for i, moments in ours["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(mine["state"][i][name].float(), moments[name],
                                           **close)
            assert torch.equal(mine["state"][i]["step"], moments["step"])
    theta0 = [p.detach() for p in wide_net().parameters()]
    for t0, delta, name in zip(theta0, rounded["theta_delta"], exact["names"], strict=True):
        torch.testing.assert_close(delta.float(), exact["model"][name] - t0, **close)
    # The resumed chain is another chain from a start moved by that rounding: most scales
    # agree to 1%, a few near Adam's sign flips or the floor do not, and the top-scale mask
    # nearly keeps its entries.
    whole = run(small_config(), model=wide_net())
    resumed = run(small_config(checkpoint_precision="bf16"), model=wide_net(),
                  checkpoint_path=rounded_path)
    a, b = (torch.cat([v.reshape(-1) for v in r.mean.values()]) for r in (whole, resumed))
    assert not torch.equal(a, b)
    assert ((a - b).abs() > 1e-2 * a).float().mean() < 0.01
    assert abs(float(b.sum() / a.sum()) - 1) < 1e-4
    k = a.numel() // 200  # a 0.5% mask
    kept = set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())
    assert len(kept) >= 0.95 * k


def test_old_or_foreign_checkpoints_are_refused(tmp_path):
    path = _killed_checkpoint(small_config(), tmp_path / "ckpt.pt", 25, net=tiny_net)
    state = files.load_checkpoint(path)
    with pytest.raises(files.FileFormatError, match="other starting weights"):
        run(small_config(), model=tiny_net(seed=1), checkpoint_path=path)  # another theta0
    files.save_checkpoint(path, {**state, "version": 3})
    with pytest.raises(files.FileFormatError, match="version 3, written by an older"):
        run(small_config(), checkpoint_path=path)


@pytest.mark.parametrize("preset", ["cold", "reference"])
def test_bf16_checkpoint_resumes_every_preset(tmp_path, preset):
    config = small_config(preset, checkpoint_precision="bf16")
    path = _killed_checkpoint(config, tmp_path / "ckpt.pt", 25, net=tiny_net)
    moments = files.load_checkpoint(path)["opt_theta"]["state"].values()
    assert all(m["exp_avg"].dtype == torch.bfloat16 for m in moments)
    whole, resumed = run(config), run(config, checkpoint_path=path)
    assert resumed.n_samples == whole.n_samples
    for name in whole.mean:
        torch.testing.assert_close(resumed.mean[name], whole.mean[name], rtol=0.1, atol=1e-6)
