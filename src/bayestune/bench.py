"""`make bench`: step time and peak memory of stage 1 and stage 2 against plain AdamW.

Every figure is a ratio against plain AdamW full fine-tuning of the same model, measured in the
same run: median step time over ``steps`` timed steps after ``warmup`` untimed ones, on a fixed
random batch (16 x 128 token ids). Each configuration runs in a fresh subprocess so that its
peak memory is its own: on CUDA ``max_memory_allocated``; on the CPU the peak resident set size
(VmHWM, reset through /proc/self/clear_refs once the model is built, so loading transients do
not count). Peak memory is counted from before the model is built, so it includes the weights:
it is what a job needs, not only what training adds. The delta ratio compares the sparse delta
file of the stage-2 run (budget 0.005) with a safetensors file of the model's whole state dict.

Beside the stage-1 ratio stands its floor: the bytes stage 1 must move per step beyond AdamW's
step however well fused (:data:`STAGE1_EXTRA_BYTES` per scalar) over the device's memory
bandwidth, measured with a large copy in the timing process; the step ratio cannot go below
(AdamW step + that time) / AdamW step.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bayestune.errors import ConfigError

log = logging.getLogger(__name__)

MODELS = ("minilm", "roberta-base-random", "tiny-random")
CONFIGS = ("full", "stage1", "stage2")
BATCH_SIZE, SEQ_LEN, BUDGET = 16, 128, 0.005
# Limits on the ratios to plain AdamW full fine-tuning (on a GPU the stage-1 step aims at 1.1).
GOALS = {"stage1_step_ratio": 1.15, "stage1_peak_mem_ratio": 1.35, "stage2_step_ratio": 1.05,
         "stage2_peak_mem_ratio": 0.9, "delta_bytes_ratio": 0.02}
MEMORY_STEPS = 3
# fp32 bytes per scalar that stage 1 moves beyond AdamW's step in a perfectly fused update:
# read theta0 (4), read and write lambda (8) and lambda's two Adam moments (16). The noise
# is computed, not moved; the running mean is touched once every `thinning` steps.
STAGE1_EXTRA_BYTES = 28
COPY_BYTES = 1 << 28  # per buffer of the bandwidth copy: far beyond any CPU cache


# --- the worker: one configuration in its own process ---------------------------------------
def build_bench_model(name: str):
    """The benchmark's classification model (encoder + ``head.*``), seeded."""
    from transformers import BertConfig, RobertaConfig

    from bayestune.models.text import build_text_model, build_text_model_from_config

    if name == "minilm" or Path(name).is_dir():  # a folder: MiniLM carried where pip can't
        return build_text_model(name, "classification", 2, seed=0)
    if name == "roberta-base-random":  # RoBERTa-base's dimensions, no download needed
        config = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                               num_attention_heads=12, intermediate_size=3072,
                               max_position_embeddings=514, type_vocab_size=1)
        return build_text_model_from_config(config, "classification", 2, seed=0)
    if name == "tiny-random":  # for the smoke test
        config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64)
        return build_text_model_from_config(config, "classification", 2, seed=0)
    raise ValueError(f"unknown bench model {name!r}; choose one of {', '.join(MODELS)}")


def _batch(vocab_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, vocab_size, (BATCH_SIZE, seq_len), generator=gen),
            "attention_mask": torch.ones(BATCH_SIZE, seq_len, dtype=torch.long),
            "labels": torch.randint(0, 2, (BATCH_SIZE,), generator=gen)}


def _rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status; CPU memory needs Linux")


def _release_and_reset_peak(device: torch.device) -> None:
    """Drop setup garbage and start peak accounting from the current usage."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, or RSS keeps it
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)


def _memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else _rss_bytes()


def _peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_bytes("VmHWM")


def _full_step(model, batch, device) -> tuple[Callable[[], None], dict]:
    from bayestune.finetune import FinetuneConfig, make_updater, train_step
    from bayestune.optim import linear_schedule_with_warmup

    config = FinetuneConfig()
    updater = make_updater(model, None, config)
    scheduler = linear_schedule_with_warmup(updater.optimizer, 0, 10_000)
    return lambda: train_step(model, batch, updater, scheduler, config, device), {
        "n_trainable": updater.n_trainable}


def _stage2_step(model, batch, device, workdir: Path) -> tuple[Callable[[], None], dict]:
    from safetensors.torch import save_file

    from bayestune.finetune import FinetuneConfig, make_updater, train_step
    from bayestune.masks import masks_from_scores
    from bayestune.optim import linear_schedule_with_warmup

    # theta0 goes to disk, not memory: it is also the full-state file the delta is compared to
    save_file({n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()},
              str(workdir / "full.safetensors"))
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    mask = masks_from_scores(scores, [BUDGET])[BUDGET]  # random scores: touches every tensor
    del scores
    config = FinetuneConfig()
    updater = make_updater(model, mask, config)
    del mask
    scheduler = linear_schedule_with_warmup(updater.optimizer, 0, 10_000)
    return lambda: train_step(model, batch, updater, scheduler, config, device), {
        "n_trainable": updater.n_trainable}


def _delta_sizes(model, workdir: Path) -> dict:
    from safetensors.torch import load_file

    from bayestune import files
    from bayestune.delta import DELTA_META, make_delta

    theta0 = load_file(str(workdir / "full.safetensors"))
    delta = make_delta(model.cpu(), theta0)
    files.save_delta(workdir / "delta.safetensors", delta, dict(DELTA_META))
    return {"delta_bytes": (workdir / "delta.safetensors").stat().st_size,
            "full_state_bytes": (workdir / "full.safetensors").stat().st_size,
            "delta_scalars": sum(vals.numel() for _, vals in delta.values())}


def _stage1_step(model, batch, device) -> tuple[Callable[[], None], dict]:
    from bayestune.models.base import task_loss
    from bayestune.sampler import Sampler, SamplerConfig

    # The SGLD phase from the first step (samples every 100 steps, as the reference thins), so
    # every timed step pays for prior, noise and both optimisers; `sample_scales` runs the
    # same `Sampler.advance` per batch.
    config = SamplerConfig(steps=10**9, warmup_steps=0, burnin_steps=0, thinning=100)
    sampler = Sampler(model, task_loss, config, seed=0, device=device)
    return lambda: sampler.advance(batch), {"n_trainable": sum(sampler.sizes)}


def _setup(config: str, model_name: str, device: torch.device, seq_len: int,
           workdir: Path) -> tuple[torch.nn.Module, Callable[[], None], dict]:
    from bayestune.models.base import move_batch

    torch.manual_seed(0)
    model = build_bench_model(model_name).to(device).train()
    batch = move_batch(_batch(model.encoder.config.vocab_size, seq_len), device)
    if config == "full":
        step, info = _full_step(model, batch, device)
    elif config == "stage2":
        step, info = _stage2_step(model, batch, device, workdir)
    elif config == "stage1":
        step, info = _stage1_step(model, batch, device)
    else:
        raise ValueError(f"unknown bench configuration {config!r}; one of {', '.join(CONFIGS)}")
    info.update(n_params=sum(p.numel() for p in model.parameters()))
    return model, step, info


def _timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def memory_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Bytes per second that a large copy moves (read plus write), median of ``repeats``."""
    src = torch.ones(COPY_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    seconds = statistics.median(_timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * COPY_BYTES / seconds


def _import_everything() -> None:
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.roberta.modeling_roberta  # noqa: F401

    import bayestune.delta  # noqa: F401
    import bayestune.finetune  # noqa: F401
    import bayestune.masks  # noqa: F401
    import bayestune.models.text  # noqa: F401
    import bayestune.sampler  # noqa: F401


def memory_job(job: dict) -> dict:
    """Peak memory of one configuration; a fresh process has nothing else in it."""
    from bayestune.models.base import resolve_device

    device = resolve_device(job["device"])
    _import_everything()  # module imports are not the configuration's memory
    _release_and_reset_peak(device)
    start_mem = _memory_now(device)
    workdir = Path(job["workdir"])
    model, step, info = _setup(job["config"], job["model"], device, job["seq_len"], workdir)
    _release_and_reset_peak(device)
    for _ in range(MEMORY_STEPS):  # optimiser state appears on step 1; the peak is steady after
        step()
    info.update(peak_mem_bytes=_peak_memory(device) - start_mem, device=str(device),
                torch_threads=torch.get_num_threads())
    if job["config"] == "stage2":
        info.update(_delta_sizes(model, workdir))
    return info


def timing_job(job: dict) -> dict:
    """Step times of all configurations, interleaved step by step in one process.

    On a shared machine the load drifts over minutes; taking the configurations' steps in turn
    (in a rotating order) exposes each to the same drift, so the ratios stay fair.
    """
    from bayestune.models.base import resolve_device

    device = resolve_device(job["device"])
    bandwidth = memory_bandwidth(device)
    workdir = Path(job["workdir"]) / "timing"
    workdir.mkdir(exist_ok=True)
    steps = {c: _setup(c, job["model"], device, job["seq_len"], workdir)[1] for c in CONFIGS}
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for i in range(job["warmup"] + job["steps"]):
        order = CONFIGS[i % len(CONFIGS):] + CONFIGS[:i % len(CONFIGS)]
        for config in order:
            seconds = _timed(steps[config], device)
            if i >= job["warmup"]:
                times[config].append(seconds)
    result = {c: {"step_seconds": statistics.median(t), "step_times": t}
              for c, t in times.items()}
    return {**result, "bandwidth_bytes_per_s": bandwidth}


def run_worker(job: dict) -> dict:
    """Entry point of a worker process (see :func:`run_bench`)."""
    return timing_job(job) if job["job"] == "timing" else memory_job(job)


# --- the driver -----------------------------------------------------------------------------
def _spawn(job: dict) -> dict:
    cmd = [sys.executable, "-m", "bayestune.bench", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {job['config']} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(out: Path, model: str = "minilm", steps: int = 12, warmup: int = 3,
              device: str = "auto", seq_len: int = SEQ_LEN, isolate: bool = True) -> dict:
    """Measure plain AdamW, stage 1 and stage 2 on ``model``; write and return the record.

    One process times all three configurations (interleaved); one fresh process per
    configuration measures its peak memory (and, for stage 2, the delta file). ``isolate=False``
    runs the jobs in this process instead (quick checks only: the peaks then mix together).
    """
    from bayestune import files

    if model not in MODELS and not Path(model).is_dir():
        raise ConfigError(f"unknown bench model {model!r}; choose one of {', '.join(MODELS)} "
                          "or a model folder (e.g. .carry/minilm, `make gpu-carry`)")
    if steps < 1 or warmup < 0:
        raise ConfigError(f"steps must be >= 1 and warmup >= 0 (got {steps}, {warmup})")
    common = {"model": model, "device": device, "seq_len": seq_len}
    run = _spawn if isolate else run_worker
    with tempfile.TemporaryDirectory(prefix="bayestune-bench-") as workdir:
        memory = {}
        for config in CONFIGS:
            log.info("bench %s: peak memory of %s", model, config)
            memory[config] = run({"job": "memory", "config": config, "workdir": workdir,
                                  **common})
        log.info("bench %s: step times, %d interleaved steps after %d warm-up", model, steps,
                 warmup)
        timing = run({"job": "timing", "steps": steps, "warmup": warmup, "workdir": workdir,
                      **common})
    record = _record(memory, timing, model, steps, warmup, seq_len)
    files.write_json(out, record)
    return record


def _record(memory: dict, timing: dict, model: str, steps: int, warmup: int,
            seq_len: int) -> dict:
    full, stage2 = memory["full"], memory["stage2"]
    on_cuda = full["device"].startswith("cuda")
    record = {"model": model, "device": full["device"], "steps": steps, "warmup": warmup,
              "batch_size": BATCH_SIZE, "seq_len": seq_len, "budget": BUDGET,
              "n_params": full["n_params"], "torch_threads": full["torch_threads"],
              "memory": "cuda max_memory_allocated" if on_cuda
              else "peak RSS (VmHWM) above the process before the model was built"}
    for config in CONFIGS:
        record[f"{config}_step_seconds"] = timing[config]["step_seconds"]
        record[f"{config}_step_times"] = timing[config]["step_times"]
        record[f"{config}_peak_mem_bytes"] = memory[config]["peak_mem_bytes"]
        record[f"{config}_n_trainable"] = memory[config]["n_trainable"]
        if config != "full":
            record[f"{config}_step_ratio"] = (timing[config]["step_seconds"]
                                              / timing["full"]["step_seconds"])
            record[f"{config}_peak_mem_ratio"] = (memory[config]["peak_mem_bytes"]
                                                  / full["peak_mem_bytes"])
    record.update(delta_bytes=stage2["delta_bytes"], full_state_bytes=stage2["full_state_bytes"],
                  delta_scalars=stage2["delta_scalars"],
                  delta_bytes_ratio=stage2["delta_bytes"] / stage2["full_state_bytes"])
    extra = STAGE1_EXTRA_BYTES * record["stage1_n_trainable"]
    floor = extra / timing["bandwidth_bytes_per_s"]
    record.update(bandwidth_bytes_per_s=timing["bandwidth_bytes_per_s"],
                  stage1_extra_bytes=extra, stage1_floor_seconds=floor,
                  stage1_floor_step_ratio=1 + floor / record["full_step_seconds"])
    record["goals"] = {key: {"limit": limit, "met": record[key] <= limit}
                       for key, limit in GOALS.items()}
    return record


def print_table(result: dict) -> None:
    """The record as a small table on stdout."""
    mib = 2 ** 20
    print(f"bench: {result['model']} on {result['device']}, batch {result['batch_size']}x"
          f"{result['seq_len']}, median of {result['steps']} steps after {result['warmup']}")
    print(f"{'config':<8} {'trainable':>12} {'step s':>9} {'x full':>7} {'peak MiB':>10} "
          f"{'x full':>7}")
    for config in CONFIGS:
        step_ratio = result.get(f"{config}_step_ratio", 1.0)
        mem_ratio = result.get(f"{config}_peak_mem_ratio", 1.0)
        print(f"{config:<8} {result[f'{config}_n_trainable']:>12,} "
              f"{result[f'{config}_step_seconds']:>9.4f} {step_ratio:>7.3f} "
              f"{result[f'{config}_peak_mem_bytes'] / mib:>10.1f} {mem_ratio:>7.3f}")
    print(f"stage 1 floor: {result['stage1_extra_bytes'] / 1e6:.0f} MB more per step than "
          f"AdamW at {result['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (a copy) = "
          f"{result['stage1_floor_seconds']:.4f} s: step ratio >= "
          f"{result['stage1_floor_step_ratio']:.3f} (measured "
          f"{result['stage1_step_ratio']:.3f})")
    print(f"delta at p={result['budget']}: {result['delta_bytes'] / mib:.2f} MiB vs full state "
          f"{result['full_state_bytes'] / mib:.1f} MiB (x{result['delta_bytes_ratio']:.4f})")
    for key, goal in result["goals"].items():
        print(f"goal {key} <= {goal['limit']}: {'met' if goal['met'] else 'NOT met'}")


if __name__ == "__main__":
    print(json.dumps(run_worker(json.loads(sys.argv[1]))))
