"""The BayesTune prior: Laplace(theta0, lambda) on each scalar, Gamma(alpha, beta) on lambda.

Everything here is the *tempered negative log-prior* of BayesTune, i.e. divided by the
effective data size N (``temperature``) and with constants dropped::

    U_prior = (1/N) sum_i [ |theta_i - theta0_i| / lam_i + log lam_i
                            - (alpha - 1) log lam_i + beta lam_i ]

where ``lam_i = max(lambda_i, floor)``. Two gradients in lambda are offered
(``floor_gradient``):

* ``"zero"``: the exact gradient of that function (what autograd gives). U does not depend on
  lambda at or below the floor, so dU/dlambda = 0 there and only the noise moves lambda back up.
* ``"clamped"``: the authors' code, which evaluates the formula at the clamped value. At the
  floor |theta - theta0| / lam^2 is 1e16 |theta - theta0|: one such kick swamps Adam's second
  moment and freezes that lambda (and its theta) for thousands of steps.

Two forms of the same maths: per-tensor methods (readable; the tests check them against
autograd) and :meth:`LaplaceGammaPrior.add_grads_`, which takes whole lists of tensors (the
sampler passes pieces of the parameters, see :class:`FlatLayout`) and does each step of the
formula as one ``torch._foreach_*`` op, with no per-tensor Python work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bayestune.errors import ConfigError

FLOOR_GRADIENTS = ("zero", "clamped")


@dataclass(frozen=True)
class LaplaceGammaPrior:
    alpha: float = 0.01        # Gamma shape of the hyper-prior on lambda
    beta: float = 100.0        # Gamma rate of the hyper-prior on lambda
    temperature: float = 1e12  # N: the prior is divided by it
    floor: float = 1e-8        # lambda is used as max(lambda, floor)
    floor_gradient: str = "zero"  # dU/dlambda at or below the floor: "zero" or "clamped"
    # N of lambda's gradient alone (None: temperature). Another value splits U in two, one per
    # variable: theta's prior term keeps N, lambda's takes this one (no single U then).
    lambda_temperature: float | None = None

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "temperature", "floor", "n_lambda"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"prior {name} must be > 0, got {getattr(self, name)}")
        if self.floor_gradient not in FLOOR_GRADIENTS:
            raise ConfigError(f"prior floor_gradient {self.floor_gradient!r} is not one of "
                              f"{', '.join(FLOOR_GRADIENTS)}")

    @property
    def n_lambda(self) -> float:
        """The N dividing lambda's prior gradient (and setting its noise in the sampler)."""
        return self.temperature if self.lambda_temperature is None else self.lambda_temperature

    def scale(self, lam: Tensor) -> Tensor:
        """The value of lambda actually used: max(lambda, floor)."""
        return lam.clamp_min(self.floor)

    # --- per tensor -------------------------------------------------------------------------
    def neg_log_prior(self, theta: Tensor, theta0: Tensor, lam: Tensor) -> Tensor:
        """U_prior summed over the tensor (differentiable in theta; in lambda above the floor)."""
        lam = self.scale(lam)
        log_lam = torch.log(lam)
        terms = ((theta - theta0).abs() / lam + log_lam - (self.alpha - 1.0) * log_lam
                 + self.beta * lam)
        return terms.sum() / self.temperature

    def grad_theta(self, theta: Tensor, theta0: Tensor, lam: Tensor) -> Tensor:
        """dU_prior/dtheta = sign(theta - theta0) / (N lam)."""
        return torch.sign(theta - theta0) / (self.temperature * self.scale(lam))

    def grad_lambda(self, theta: Tensor, theta0: Tensor, lam: Tensor) -> Tensor:
        """dU_prior/dlambda = (1/N) [(2 - alpha)/lam - |theta - theta0|/lam^2 + beta] above the
        floor; at and below it 0 (U is flat in lambda there; autograd through clamp agrees), or
        with ``floor_gradient="clamped"`` the same formula at lam = floor."""
        above = lam > self.floor
        lam = self.scale(lam)
        dist = (theta - theta0).abs()
        grad = ((2.0 - self.alpha) / lam - dist / lam.square() + self.beta) / self.n_lambda
        return grad if self.floor_gradient == "clamped" else grad * above

    # --- fused: lists of tensors, one multi-tensor op per pass -------------------------------
    @torch.no_grad()
    def add_grads_(
        self,
        thetas: Sequence[Tensor],
        theta0s: Sequence[Tensor],
        lams: Sequence[Tensor],
        theta_grads: Sequence[Tensor],
    ) -> list[Tensor]:
        """Add dU/dtheta to ``theta_grads`` in place and return dU/dlambda (new tensors).

        The four lists pair up tensor by tensor (same shapes). Every line is one
        ``torch._foreach_*`` op over the whole lists; besides the returned gradients only two
        lists are allocated (1/lam and a scratch), freed on return.
        """
        n, n_lam, floor = self.temperature, self.n_lambda, self.floor
        thetas, theta0s, lams, theta_grads = map(list, (thetas, theta0s, lams, theta_grads))
        inv = torch._foreach_clamp_min(lams, floor)
        torch._foreach_reciprocal_(inv)                      # 1 / max(lam, floor)
        diff = torch._foreach_sub(thetas, theta0s)           # theta - theta0
        scratch = torch._foreach_sign(diff)
        torch._foreach_mul_(scratch, inv)
        torch._foreach_add_(theta_grads, scratch, alpha=1.0 / n)
        if self.floor_gradient == "zero":
            # gate: 1 where lam > floor, else 0 (U is flat in lambda there, as autograd says)
            torch._foreach_copy_(scratch, lams)
            torch._foreach_sub_(scratch, floor)
            torch._foreach_sign_(scratch)
            torch._foreach_clamp_min_(scratch, 0.0)
            torch._foreach_mul_(inv, scratch)                # zero inv gates all three terms
        # dU/dlam = -(1/N) inv (|d| inv - (2 - alpha) - beta lam): beta lam inv is beta above
        # the floor and 0 where the gate zeroed inv; clamped, beta is added as it is
        torch._foreach_abs_(diff)
        torch._foreach_mul_(diff, inv)
        if self.floor_gradient == "zero":
            torch._foreach_add_(diff, lams, alpha=-self.beta)
        torch._foreach_add_(diff, -(2.0 - self.alpha))
        torch._foreach_mul_(diff, inv)
        torch._foreach_mul_(diff, -1.0 / n_lam)
        if self.floor_gradient == "clamped":
            torch._foreach_add_(diff, self.beta / n_lam)
        return diff


class FlatLayout:
    """A list of tensors laid end to end in one flat buffer, cut into pieces.

    A piece is a run of at most ``max_piece`` scalars inside one tensor (None: whole tensors).
    The sampler keeps theta0 and lambda as flat buffers and works on them piece by piece: on
    the CPU small pieces let the multi-tensor ops run in cache and keep every temporary small
    (small allocations reuse freed heap memory instead of faulting in fresh pages).
    """

    def __init__(self, tensors: Sequence[Tensor], max_piece: int | None = 1 << 16) -> None:
        self.shapes = [t.shape for t in tensors]
        self.sizes = [t.numel() for t in tensors]
        self.numel = sum(self.sizes)
        self.index = [(i, start, min(start + (max_piece or size), size))
                      for i, size in enumerate(self.sizes)
                      for start in range(0, size, max_piece or max(size, 1))]
        self.piece_sizes = [stop - start for _, start, stop in self.index]

    def pieces(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """1-D views of the pieces of ``tensors`` (which must be laid out like the layout's)."""
        flat = [t.view(-1) for t in tensors]
        return [flat[i][start:stop] for i, start, stop in self.index]

    def flat_pieces(self, flat: Tensor) -> list[Tensor]:
        """1-D views of the pieces of a flat buffer."""
        self._check(flat)
        return list(torch.split(flat, self.piece_sizes))

    def views(self, flat: Tensor) -> list[Tensor]:
        """Per-tensor views into ``flat``, shaped like the tensors: writing one writes it."""
        self._check(flat)
        return [v.view(s) for v, s in zip(torch.split(flat, self.sizes), self.shapes,
                                          strict=True)]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """A new flat copy of ``tensors``."""
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def groups(self, budget: int | None) -> list[slice]:
        """Consecutive runs of pieces with at most ``budget`` scalars (None: one run)."""
        if budget is None:
            return [slice(0, len(self.index))]
        runs, start, total = [], 0, 0
        for k, size in enumerate(self.piece_sizes):
            if total and total + size > budget:
                runs.append(slice(start, k))
                start, total = k, 0
            total += size
        runs.append(slice(start, len(self.index)))
        return runs

    def _check(self, flat: Tensor) -> None:
        if flat.numel() != self.numel:
            raise ValueError(f"flat buffer has {flat.numel()} scalars, layout {self.numel}")
