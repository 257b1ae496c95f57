"""Saving and resuming a stage-1 chain: the checkpoint's content (optionally bf16), the checks
that a checkpoint belongs to this run (its inputs, seed, settings, model and device type) and
the restore of the global RNG. :class:`SamplerCheckpoint` is the part of
:class:`bayestune.sampler.Sampler` that reads and writes its state."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from bayestune import files
from bayestune.guards import describe_changes
from bayestune.running_stats import STORED_DTYPES
from bayestune.sampler.config import SamplerConfig, SamplerConfigError

# 4: theta0 by fingerprint, not by value; lambda only once it moved; M2 only with variance;
# optionally bf16 state. 5: what the chain was made from (the prepared data's fingerprint, the
# batch size, ...: Sampler.inputs) and the chain diagnostics so far.
CHECKPOINT_VERSION = 5
# Fields that do not change the samples: a checkpoint may be resumed with other values.
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "checkpoint_precision")


class SamplerCheckpoint:
    """The checkpoint methods of :class:`bayestune.sampler.Sampler` (which sets every attribute
    they read)."""

    # In model-sized buffers (fp32 / bf16): the model's weights (1 / 0.5, where bf16 stores
    # theta - theta0) and theta's two AdamW moments (2 / 1); once SGLD has moved lambda, lambda
    # and its two Adam moments (3 / 1.5); once samples are recorded, the running mean (1 / 0.5)
    # and, with `variance`, M2 (1 / 0.5). So at most 7x (fp32) or 3.5x (bf16) the model, 8x /
    # 4x with M2. theta0 is never stored: the resuming run rebuilds it from the model source
    # and checks it by its fingerprint. Bit-identical resuming needs every other fp32 value.
    def theta0_fingerprint(self) -> str:
        """A hash of theta0's bytes (computed once: theta0 never changes)."""
        if self._theta0_fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            for chunk in torch.split(self.theta0_flat.detach(), 1 << 22):
                digest.update(chunk.cpu().contiguous().view(torch.uint8).numpy())
            self._theta0_fingerprint = digest.hexdigest()
        return self._theta0_fingerprint

    @property
    def lambda_moved(self) -> bool:
        """Whether an SGLD step has run (before that lambda is lambda_init everywhere)."""
        return self.step > 0 and self.config.in_sgld(self.step - 1)

    def state_dict(self, seed: int) -> dict[str, Any]:
        """Everything to resume from; "stats" names the attachments (see :meth:`attachments`)
        that hold the running statistics, none before the first sample."""
        bf16 = self.config.checkpoint_precision == "bf16"
        model, theta_delta = self._model_state(bf16)
        return {
            "version": CHECKPOINT_VERSION, "seed": seed, "config": _resume_key(self.config),
            "precision": self.config.checkpoint_precision,
            "names": self.names, "shapes": [list(s) for s in self.shapes],
            "pieces": self.layout.piece_sizes, "steps_per_epoch": self.steps_per_epoch,
            "step": self.step, "epoch": self.epoch, "position": self.position,
            "theta0": self.theta0_fingerprint(), "model": model, "theta_delta": theta_delta,
            "lam": _rounded(self.lam_flat.detach(), bf16) if self.lambda_moved else None,
            "opt_theta": _optimiser_state(self.opt_theta, bf16),
            "opt_lam": [_optimiser_state(opt, bf16) for opt in self.opt_lams],
            "schedule": self.schedule.state_dict() if self.schedule else None,
            "length_rule": self.length_rule.state_dict() if self.length_rule else None,
            "stopped": self.stopped, "inputs": self.inputs,
            "monitor": self.chain_monitor.state_dict() if self.chain_monitor else None,
            "count": self.count, "stats": list(self.stats.regions) if self.stats else [],
            "noise_rng": self.noise.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }

    def _model_state(self, bf16: bool) -> tuple[dict[str, Tensor], list[Tensor] | None]:
        """The model's state dict; with bf16, its sampled parameters as bf16 changes from
        theta0 instead (rounding a change, not a weight, keeps the error to that of the
        change)."""
        state = self.model.state_dict()
        if not bf16:
            return state, None
        sampled = set(self.names)
        delta = [(p.detach() - t0).to(torch.bfloat16)
                 for p, t0 in zip(self.params, self.theta0s, strict=True)]
        return {k: v for k, v in state.items() if k not in sampled}, delta

    def attachments(self) -> dict[str, Callable[[BinaryIO], None]]:
        """Writers of the running statistics, streamed into the checkpoint file."""
        if self.stats is None:
            return {}
        dtype = STORED_DTYPES[self.config.checkpoint_precision]
        return {name: self.stats.writer(k, dtype) for k, name in enumerate(self.stats.regions)}

    def save_checkpoint(self, path: Path, seed: int) -> None:
        files.save_checkpoint(path, self.state_dict(seed), self.attachments())

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], seed: int, path: Path) -> None:
        """Restore everything but torch's global RNG (see :func:`_restore_global_rng`); the
        running statistics come from the attachments of the checkpoint file at ``path``."""
        _check_resumable(state, self, seed, path)
        self._load_model(state, path)
        if state["lam"] is None:
            self.lam_flat.fill_(self.config.lambda_init)
        else:
            self.lam_flat.copy_(state["lam"])
        if self.opt_theta is not None:  # torch casts bf16 moments back to the parameters' dtype
            self.opt_theta.load_state_dict(state["opt_theta"])
        for opt, saved in zip(self.opt_lams, state["opt_lam"], strict=True):
            opt.load_state_dict(saved)
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        if self.length_rule is not None:
            self.length_rule.load_state_dict(state["length_rule"])
        self.stopped = state["stopped"]
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.noise.set_state(state["noise_rng"])
        if self.chain_monitor is not None:
            self.chain_monitor.load_state_dict(state["monitor"], resumed_at=self.step)
        self.close()
        self.stats = None
        if state["count"] > 0:
            self.stats = self._new_stats()
            self.stats.count = state["count"]
            dtype = STORED_DTYPES[state["precision"]]
            for k, name in enumerate(state["stats"]):
                with files.open_checkpoint_attachment(path, name) as stream:
                    self.stats.load(k, stream, path, dtype)

    def _load_model(self, state: dict[str, Any], path: Path) -> None:
        if state["theta_delta"] is None:
            self.model.load_state_dict(state["model"])
            return
        missing = self.model.load_state_dict(state["model"], strict=False).missing_keys
        if not set(missing) <= set(self.names):
            raise files.FileFormatError(f"{path}: the checkpoint lacks {sorted(missing)[0]}; "
                                        "delete it to start over")
        for p, t0, delta in zip(self.params, self.theta0s,
                                state["theta_delta"], strict=True):
            p.copy_(t0 + delta.to(p.device, p.dtype))


def _rounded(t: Tensor, bf16: bool) -> Tensor:
    return t.to(torch.bfloat16) if bf16 else t


def _optimiser_state(opt: torch.optim.Optimizer | None, bf16: bool) -> dict[str, Any] | None:
    """The optimiser's state dict, its moments in bf16 if asked (steps stay exact)."""
    if opt is None:
        return None
    state = opt.state_dict()
    if bf16:
        state["state"] = {
            key: {name: _rounded(v, v.is_floating_point() and v.dim() > 0)
                  if torch.is_tensor(v) else v for name, v in per_param.items()}
            for key, per_param in state["state"].items()}
    return state


def _resume_key(config: SamplerConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE_CHANGES}


def _check_resumable(state: dict[str, Any], sampler: SamplerCheckpoint, seed: int,
                     path: Path) -> None:
    fix = f"delete {path} to start over, or resume with the settings that wrote it"
    version = state.get("version")
    if isinstance(version, int) and version < CHECKPOINT_VERSION:
        raise files.FileFormatError(f"{path}: a sampler checkpoint of version {version}, written "
                                    "by an older bayestune; this one reads version "
                                    f"{CHECKPOINT_VERSION} (it records the data and batch size "
                                    "it was made from): delete it to start over")
    if version != CHECKPOINT_VERSION:
        raise files.FileFormatError(f"{path}: not a sampler checkpoint of this version; {fix}")
    changed = describe_changes(state["inputs"], sampler.inputs)
    if changed:
        raise SamplerConfigError(f"{path} was made from other inputs than this run's "
                                 f"({'; '.join(changed)}): resuming would go on with a chain of "
                                 "other data; delete it to start over with these inputs, or "
                                 "resume with the prepared data, batch size and task that "
                                 "wrote it")
    if state["seed"] != seed:
        raise SamplerConfigError(f"{path} was written with seed {state['seed']}, not {seed}; "
                                 f"{fix}")
    ours = _resume_key(sampler.config)
    changed = sorted(k for k in ours if state["config"].get(k) != ours[k])
    if changed:
        diffs = ", ".join(f"{k}: {state['config'].get(k)!r} -> {ours[k]!r}" for k in changed)
        raise SamplerConfigError(f"{path} was written with other sampler settings ({diffs}); "
                                 f"{fix}")
    if state["names"] != sampler.names or state["shapes"] != [list(s) for s in sampler.shapes]:
        raise files.FileFormatError(f"{path}: checkpoint of another model; {fix}")
    if state["theta0"] != sampler.theta0_fingerprint():
        raise files.FileFormatError(f"{path}: written from other starting weights theta0 "
                                    "(another model file or seed); resume with the --model and "
                                    f"--seed that wrote it, or {fix}")
    if (state["pieces"] != sampler.layout.piece_sizes  # lambda's optimiser state is by piece
            or len(state["opt_lam"]) != len(sampler.opt_lams)):  # and by block
        raise SamplerConfigError(f"{path} was written on another device type (cpu vs cuda); "
                                 f"resume it on the same kind of device, or {fix}")
    if sampler.schedule is not None and state["steps_per_epoch"] != sampler.steps_per_epoch:
        raise SamplerConfigError(f"{path} was written with {state['steps_per_epoch']} steps per "
                                 f"epoch, not {sampler.steps_per_epoch} (the schedule's length "
                                 f"depends on it); {fix}")
    if sampler.limit is not None and state["step"] > sampler.limit:
        raise SamplerConfigError(f"{path} is at step {state['step']}, past steps="
                                 f"{sampler.limit}; {fix}")


def _restore_global_rng(state: dict[str, Any]) -> None:
    # Done after re-reading the interrupted epoch's first batches, so that whatever the batch
    # stream draws from the global RNG cannot shift the dropout masks of later steps.
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
