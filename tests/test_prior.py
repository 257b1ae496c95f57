"""The prior's gradients against autograd, and the fused form against the per-tensor form."""

from __future__ import annotations

import math

import pytest
import torch

from bayestune.prior import FlatLayout, LaplaceGammaPrior

SHAPES = [(7,), (3, 5), (2, 3, 4), (1,)]
FLOOR = 1e-8


def _case(shape, seed, dtype=torch.float64):
    """Random theta, theta0 and lambda, with lambdas below, at and above the floor and some
    theta exactly at theta0 (where |.| has its kink)."""
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(shape, generator=g, dtype=dtype)
    theta = theta0 + 1e-3 * torch.randn(shape, generator=g, dtype=dtype)
    lam = torch.rand(shape, generator=g, dtype=dtype) * 1e-3
    flat_theta, flat_lam = theta.view(-1), lam.view(-1)
    flat_theta[::3] = theta0.view(-1)[::3]           # d = 0
    flat_lam[1::4] = FLOOR                           # exactly at the floor
    flat_lam[2::4] = -0.5 * torch.rand(flat_lam[2::4].shape, generator=g, dtype=dtype)  # below
    return theta, theta0, lam


def _autograd(prior, theta, theta0, lam):
    theta = theta.clone().requires_grad_(True)
    lam = lam.clone().requires_grad_(True)
    prior.neg_log_prior(theta, theta0, lam).backward()
    return theta.grad, lam.grad


def test_neg_log_prior_known_value():
    prior = LaplaceGammaPrior(alpha=0.5, beta=2.0, temperature=10.0, floor=FLOOR)
    value = prior.neg_log_prior(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # (1/N) [|d|/lam + log lam - (alpha - 1) log lam + beta lam]
    expected = (0.5 / 0.25 + math.log(0.25) + 0.5 * math.log(0.25) + 2.0 * 0.25) / 10.0
    assert value.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 1e12])
def test_gradients_match_autograd(shape, temperature):
    prior = LaplaceGammaPrior(alpha=0.01, beta=100.0, temperature=temperature, floor=FLOOR)
    theta, theta0, lam = _case(shape, seed=len(shape))
    want_theta, want_lam = _autograd(prior, theta, theta0, lam)
    torch.testing.assert_close(prior.grad_theta(theta, theta0, lam), want_theta,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(prior.grad_lambda(theta, theta0, lam), want_lam,
                               rtol=1e-10, atol=0)


def test_floor_case_is_covered_and_flat_below_it():
    prior = LaplaceGammaPrior(temperature=1.0, floor=FLOOR)
    theta, theta0, lam = _case((40,), seed=3)
    below, at = lam < FLOOR, lam == FLOOR
    assert below.any() and at.any()
    grad = prior.grad_lambda(theta, theta0, lam)
    assert (grad[below | at] == 0).all()              # U does not depend on lambda there
    assert (grad[lam > FLOOR] != 0).all()
    # theta sees lambda = floor below it: |sign / (N floor)| = 1e8 where theta moved
    moved = below & (theta != theta0)
    assert torch.allclose(prior.grad_theta(theta, theta0, lam)[moved].abs(),
                          torch.full((int(moved.sum()),), 1 / FLOOR, dtype=lam.dtype))


def test_clamped_floor_gradient_is_the_formula_at_the_floor():
    """The authors' gradient: (1/N) [(2 - alpha)/lam - |d|/lam^2 + beta] at lam = max(lambda,
    floor), also at and below the floor (where the exact gradient is 0)."""
    prior = LaplaceGammaPrior(alpha=0.01, beta=100.0, temperature=1e3, floor=FLOOR,
                              floor_gradient="clamped")
    theta, theta0, lam = _case((40,), seed=4)
    lam_c = lam.clamp_min(FLOOR)
    want = ((2 - 0.01) / lam_c - (theta - theta0).abs() / lam_c ** 2 + 100.0) / 1e3
    got = prior.grad_lambda(theta, theta0, lam)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    at_or_below = lam <= FLOOR
    moved = at_or_below & (theta != theta0)
    assert (got[moved] < -1e8).all()           # |d| / floor^2 dominates: a huge kick upwards
    assert (got[at_or_below & (theta == theta0)] > 0).all()
    exact = LaplaceGammaPrior(alpha=0.01, beta=100.0, temperature=1e3, floor=FLOOR)
    assert torch.equal(exact.grad_lambda(theta, theta0, lam)[~at_or_below], got[~at_or_below])
    with pytest.raises(ValueError, match="floor_gradient"):
        LaplaceGammaPrior(floor_gradient="autograd")


def test_lambda_alone_can_take_its_own_n():
    """lambda_temperature divides lambda's gradient only; theta's keeps temperature."""
    theta, theta0, lam = _case((40,), seed=5)
    paper = LaplaceGammaPrior(temperature=1e12, floor=FLOOR, floor_gradient="clamped")
    true_n = LaplaceGammaPrior(temperature=1e12, floor=FLOOR, floor_gradient="clamped",
                               lambda_temperature=8551.0)
    assert paper.n_lambda == 1e12 and true_n.n_lambda == 8551.0
    torch.testing.assert_close(true_n.grad_theta(theta, theta0, lam),
                               paper.grad_theta(theta, theta0, lam), rtol=0, atol=0)
    torch.testing.assert_close(true_n.grad_lambda(theta, theta0, lam),
                               paper.grad_lambda(theta, theta0, lam) * (1e12 / 8551.0),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="n_lambda"):
        LaplaceGammaPrior(lambda_temperature=0.0)


@pytest.mark.parametrize("lambda_temperature", [None, 37.0])
@pytest.mark.parametrize("floor_gradient", ["zero", "clamped"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_matches_per_tensor(dtype, floor_gradient, lambda_temperature):
    prior = LaplaceGammaPrior(alpha=0.01, beta=100.0, temperature=1e4, floor=FLOOR,
                              floor_gradient=floor_gradient,
                              lambda_temperature=lambda_temperature)
    cases = [_case(shape, seed=i, dtype=dtype) for i, shape in enumerate(SHAPES)]
    start = [torch.randn_like(c[0]) for c in cases]   # data gradients already there
    theta_grads = [s.clone() for s in start]
    lam_grads = prior.add_grads_([c[0] for c in cases], [c[1] for c in cases],
                                 [c[2] for c in cases], theta_grads)
    tol = {"rtol": 1e-12, "atol": 0} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 0}
    for (theta, th0, lam), s, got, got_lam in zip(cases, start, theta_grads, lam_grads,
                                                  strict=True):
        torch.testing.assert_close(got, s + prior.grad_theta(theta, th0, lam), **tol)
        torch.testing.assert_close(got_lam, prior.grad_lambda(theta, th0, lam), **tol)


def test_fused_on_pieces_of_flat_buffers_matches_per_tensor():
    prior = LaplaceGammaPrior(temperature=1e3, floor=FLOOR)
    cases = [_case(shape, seed=10 + i) for i, shape in enumerate([(9, 7), (5,), (40,)])]
    thetas = [c[0] for c in cases]
    layout = FlatLayout(thetas, max_piece=16)          # cuts tensors across pieces
    assert len(layout.index) == 4 + 1 + 3
    grads = [torch.zeros_like(t) for t in thetas]
    lam_flat = layout.flatten([c[2] for c in cases])
    lam_grads = prior.add_grads_(layout.pieces(thetas),
                                 layout.flat_pieces(layout.flatten([c[1] for c in cases])),
                                 layout.flat_pieces(lam_flat), layout.pieces(grads))
    got = layout.views(torch.cat(lam_grads))
    for (theta, th0, lam), grad, got_lam in zip(cases, grads, got, strict=True):
        torch.testing.assert_close(grad, prior.grad_theta(theta, th0, lam), rtol=1e-12, atol=0)
        torch.testing.assert_close(got_lam, prior.grad_lambda(theta, th0, lam), rtol=1e-12,
                                   atol=0)


def test_layout_groups_cover_the_pieces_within_a_budget():
    layout = FlatLayout([torch.zeros(10), torch.zeros(3), torch.zeros(25)], max_piece=8)
    assert layout.piece_sizes == [8, 2, 3, 8, 8, 8, 1]
    groups = layout.groups(12)
    assert [layout.piece_sizes[g] for g in groups] == [[8, 2], [3, 8], [8], [8, 1]]
    assert layout.groups(None) == [slice(0, 7)]
    whole = FlatLayout([torch.zeros(10), torch.zeros(0), torch.zeros(3)], max_piece=None)
    assert whole.piece_sizes == [10, 3] and [v.shape for v in whole.pieces(
        [torch.zeros(2, 5), torch.zeros(0), torch.zeros(3)])] == [(10,), (3,)]


def test_flat_layout_views_write_through_and_check_size():
    tensors = [torch.zeros(2, 3), torch.zeros(4)]
    layout = FlatLayout(tensors)
    flat = layout.flatten([torch.ones(2, 3), 2 * torch.ones(4)])
    assert layout.numel == 10 and flat.tolist() == [1.0] * 6 + [2.0] * 4
    views = layout.views(flat)
    assert [v.shape for v in views] == [torch.Size([2, 3]), torch.Size([4])]
    views[1].fill_(5.0)
    assert flat[6:].tolist() == [5.0] * 4
    with pytest.raises(ValueError, match="11 scalars"):
        layout.views(torch.zeros(11))


@pytest.mark.parametrize("field", ["alpha", "beta", "temperature", "floor"])
def test_prior_rejects_non_positive_settings(field):
    with pytest.raises(ValueError, match=field):
        LaplaceGammaPrior(**{field: 0.0})
