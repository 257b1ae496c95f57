"""Stage 1's block noise: drawn ahead on a worker or on demand, the same stream."""

import torch

from bayestune.noise import BlockNoise

SIZES = [7, 16, 3, 40, 16]


def _noise(theta: bool = True, lam: bool = True) -> BlockNoise:
    return BlockNoise(torch.Generator().manual_seed(5), SIZES, theta=theta, lam=lam,
                      device=torch.device("cpu"), dtype=torch.float32)


def _drawn(noise: BlockNoise, ahead: bool) -> list[torch.Tensor]:
    out = []
    for block in noise.blocks(ahead):
        if noise.kinds[0]:
            out.append(block.theta().clone())
        if noise.kinds[1]:
            out.append(block.lam().clone())
    return out


def test_ahead_gives_the_on_demand_draws_and_generator_state():
    for kinds in [(True, True), (False, True), (True, False)]:
        on_demand, ahead = _noise(*kinds), _noise(*kinds)
        for _ in range(2):  # the worker's buffers are reused from step to step
            want, got = _drawn(on_demand, False), _drawn(ahead, True)
            assert [t.shape[0] for t in got] == [t.shape[0] for t in want]
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert torch.equal(ahead.generator.get_state(), on_demand.generator.get_state())
        ahead.close()


def test_a_loop_stopped_early_leaves_the_generator_at_rest():
    noise = _noise()
    blocks = noise.blocks(True)
    next(blocks)
    blocks.close()  # as when a NaN check raises inside the loop: the next block was drawn
    reference = torch.Generator().manual_seed(5)
    for n in SIZES[:2]:
        torch.empty(n).normal_(generator=reference)
        torch.empty(n).normal_(generator=reference)
    assert torch.equal(noise.generator.get_state(), reference.get_state())
    noise.close()
    assert noise.pool is None
