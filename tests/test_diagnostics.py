"""Chain diagnostics: the measured gradient parts, the rank agreement, the sidecar files, the
warning and `bayestune diagnose`."""

from __future__ import annotations

import logging
import math

import pandas as pd
import pytest
import torch
from test_defects import SAMPLER_FLAGS, prepared, tiny_model_dir  # noqa: F401 (fixtures)
from test_sampler import (
    Killed,
    ce_loss,
    killed_after,
    run,
    small_config,
    tiny_data,
    tiny_net,
)

from bayestune import files
from bayestune.chain_report import describe, seed_agreement
from bayestune.cli import main
from bayestune.diagnostics import (
    ChainMonitor,
    fixed_subset,
    rank_agreement,
    write_chain_diagnostics,
)
from bayestune.sampler import Sampler, sample_scales, write_scale_file


@pytest.mark.parametrize("preset", ["exact", "reference"])
def test_watching_a_chain_does_not_change_its_samples(preset):
    plain = run(small_config(preset))
    watched = run(small_config(preset), chain_monitor=ChainMonitor(every=3))
    for name, mean in plain.mean.items():
        assert torch.equal(mean, watched.mean[name]), name


def test_measured_data_part_is_the_gradient_lambda_steps_on():
    # Plain SGLD without noise moves lambda by exactly -lr_lambda * (data/prior gradient).
    config = small_config(variant="sgld", noise_discount=0.0, warmup_steps=0, burnin_steps=1,
                          steps=3, lambda_init=0.05, lr_lambda=0.5)
    model = tiny_net()
    sampler = Sampler(model, ce_loss, config, 0, torch.device("cpu"))
    monitor = ChainMonitor(every=1)
    monitor.attach(sampler)
    sampler.chain_monitor = monitor
    batch = next(iter(tiny_data().train_epoch(0)))
    before = sampler.lam_flat.detach().clone()
    sampler.advance(batch)
    grad = (before - sampler.lam_flat.detach()) / config.lr_lambda
    rms = float(grad.double().square().mean().sqrt())
    step, measured_rms, median, at_floor, noise_larger = monitor.measured[0]
    assert step == 0 and at_floor == 0.0 and noise_larger == 0.0
    assert measured_rms == pytest.approx(rms, rel=1e-3)
    # a model this small is its own median subset
    assert median == pytest.approx(float(grad.abs().median()), rel=1e-3)
    sampler.close()


def test_noise_to_data_ratio_uses_the_closed_form_noise_scale():
    config = small_config(temperature=1e4, lr_lambda=1e-3)
    monitor = ChainMonitor(every=2)
    run(config, chain_monitor=monitor)
    phases = monitor.phase_summary()
    assert list(phases) == ["warm-up", "burn-in", "sampling"]
    noise = math.sqrt(2.0 / (1e4 * 1e-3))
    sampling = phases["sampling"]
    assert sampling["noise_rms"] == pytest.approx(noise)
    assert sampling["noise_to_data_rms"] == pytest.approx(noise / sampling["data_rms"])
    assert sampling["first_step"] == config.burnin_steps
    assert phases["warm-up"]["lambda_moves"] is False and sampling["lambda_moves"] is True
    # measured every 2nd step: steps 20, 22, ..., 38 of the sampling phase
    assert sampling["steps_measured"] == 10


def test_traces_follow_the_same_lambdas_every_thinning_step(tmp_path):
    config = small_config()
    monitor = ChainMonitor()
    result = run(config, chain_monitor=monitor)
    traces = monitor.traces()
    assert traces["steps"].tolist() == list(range(0, 40, config.thinning)) + [39]
    assert traces["lambda"].shape == (len(traces["steps"]), traces["indices"].numel())
    # warm-up keeps lambda at its start; the last trace is the final lambda
    assert torch.all(traces["lambda"][0] == config.lambda_init)
    assert traces["indices"].equal(fixed_subset(sum(t.numel() for t in result.mean.values()),
                                                1000, 1))


def test_rank_agreement_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(10_000, generator=g)
    floor = torch.full_like(a, 1e-8)
    floor[:1000] = a[:1000]  # ties at the floor: average ranks, still a defined correlation
    agreement = rank_agreement({"a": a, "same": 3 * a + 1, "reversed": -a,
                                "floored": floor, "constant": torch.ones_like(a)},
                               fraction=0.01)
    pairs = agreement["pairs"]
    assert pairs["a~same"]["spearman"] == pytest.approx(1.0)
    assert pairs["a~same"]["jaccard"] == 1.0
    assert pairs["a~reversed"]["spearman"] == pytest.approx(-1.0)
    assert pairs["a~reversed"]["jaccard"] == 0.0
    assert 0.0 < pairs["a~floored"]["spearman"] < 1.0
    assert pairs["a~constant"]["spearman"] is None
    assert agreement["jaccard_chance"] == pytest.approx(0.01 / 1.99)


def test_noise_dominated_run_is_named_in_a_warning(tmp_path, caplog):
    # The data/prior part shrinks as 1/N, the noise as 1/sqrt(N): a large N drowns the data.
    monitor = ChainMonitor(every=2)
    result = run(small_config(temperature=1e8, lr_lambda=1e-3), chain_monitor=monitor)
    scale_file = tmp_path / "seed3.safetensors"
    with caplog.at_level(logging.WARNING):
        summary = write_chain_diagnostics(scale_file, monitor, None,
                                          run={"task": "tiny", "seed": 3})
    assert summary["phases"]["sampling"]["noise_to_data_median"] > 10
    assert "stage 1 of tiny, seed 3" in caplog.text and str(scale_file) in caplog.text
    summary_path, traces_path = files.diagnostics_paths(scale_file)
    assert files.load_diagnostics(summary_path)["phases"] == summary["phases"]
    traces, meta = files.load_traces(traces_path)
    assert traces["lambda"].shape[1] == traces["indices"].numel()
    assert meta["burnin_steps"] == 20
    assert result.n_samples > 0


def test_data_dominated_run_gives_no_warning(tmp_path, caplog):
    monitor = ChainMonitor(every=2)
    run(small_config(noise_discount=0.0), chain_monitor=monitor)
    with caplog.at_level(logging.WARNING):
        summary = write_chain_diagnostics(tmp_path / "s.safetensors", monitor, None, run={})
    assert summary["phases"]["sampling"]["noise_to_data_median"] == 0.0
    assert "mostly by noise" not in caplog.text


def test_sample_writes_diagnostics_that_diagnose_prints(tmp_path, tiny_model_dir, prepared,  # noqa: F811
                                                        capsys):
    out = tmp_path / "seed0.safetensors"
    assert main(["-q", "sample", "--task", "rte", "--model", tiny_model_dir, "--data",
                 str(prepared["rte"]), "--out", str(out), *SAMPLER_FLAGS,
                 "--diagnostics-fisher-examples", "4"]) == 0
    summary = files.load_diagnostics(files.diagnostics_paths(out)[0])
    assert summary["task"] == "rte" and summary["seed"] == 0
    pairs = summary["rank_agreement"]["pairs"]
    assert {"lambda~distance", "lambda~magnitude", "lambda~fisher",
            "distance~fisher"} <= set(pairs)
    capsys.readouterr()
    assert main(["diagnose", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sampling" in text and "lambda~fisher" in text and "at the floor" in text


def test_diagnose_reads_a_checkpoint_mid_chain(tmp_path, capsys):
    config = small_config(checkpoint_every=5)
    checkpoint = tmp_path / "seed3.ckpt"
    data = tiny_data()
    with pytest.raises(Killed):
        sample_scales(tiny_net(), killed_after(data.train_epoch, 27), ce_loss, config, seed=3,
                      device="cpu", checkpoint_path=checkpoint, progress=False)
    summary = describe(checkpoint)
    assert summary["kind"] == "checkpoint" and summary["step"] == 25
    assert summary["phase"] == "sampling" and summary["n_samples"] == 2  # steps 20 and 24
    state = files.load_checkpoint(checkpoint)
    assert summary["lambda"]["q100"] == pytest.approx(float(state["lam"].max()))
    assert set(summary["rank_agreement"]["pairs"]) == {"lambda~lambda_now"}
    assert main(["diagnose", str(checkpoint)]) == 0
    assert "step 25 (sampling), 2 samples so far" in capsys.readouterr().out


def test_diagnose_names_a_file_that_is_neither(tmp_path, capsys):
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert main(["diagnose", str(other)]) != 0
    assert "notes.txt" in capsys.readouterr().err


def _seed_run(tmp_path, seed: int):
    """A tiny chain of ``seed`` written as the sample command writes it, and its 10% mask."""
    config = small_config()
    monitor = ChainMonitor()
    result = run(config, model=tiny_net(seed), seed=seed, chain_monitor=monitor)
    scale_file = tmp_path / f"seed{seed}.safetensors"
    write_scale_file(scale_file, result, config, seed=seed, model_id="tiny")
    write_chain_diagnostics(scale_file, monitor, None, run={"task": "tiny", "seed": seed})
    lam = torch.cat([t.reshape(-1) for t in result.mean.values()])
    cut = torch.topk(lam, lam.numel() // 10).values.min()
    mask = {n: t >= cut for n, t in result.mean.items()}
    mask_file = tmp_path / f"mask{seed}.safetensors"
    files.save_mask(mask_file, mask, {"budget": 0.1, "seed": seed, "method": "bayestune"})
    return scale_file, mask_file, mask


def test_figures_draw_traces_and_the_agreement_across_seeds(tmp_path):
    runs = [_seed_run(tmp_path, seed) for seed in (0, 1, 2)]
    out = tmp_path / "figures"
    assert main(["-q", "diagnose", *(str(r[0]) for r in runs), "--masks",
                 *(str(r[1]) for r in runs), "--figures-dir", str(out)]) == 0
    for name in ("lambda_traces.png", "seed_agreement.png"):
        assert (out / name).stat().st_size > 1000
    table = pd.read_csv(out / "seed_agreement.csv")
    assert len(table) == 6  # 3 pairs x (Spearman, Jaccard at 0.1)
    jaccard = table[(table.measure == "jaccard") & (table.seed_a == 0) & (table.seed_b == 1)]
    a, b = runs[0][2], runs[1][2]
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    assert float(jaccard.value.iloc[0]) == pytest.approx(inter / union)
    spearman = table[table.measure == "spearman"].value
    assert spearman.between(-1, 1).all()


def test_seed_agreement_of_one_seed_is_empty(tmp_path):
    scale_file, mask_file, _ = _seed_run(tmp_path, 0)
    assert seed_agreement([scale_file], [mask_file]).empty
