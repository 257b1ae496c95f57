"""The Gaussian draws of stage 1's fused step, block by block, optionally drawn one block ahead.

The fused step (``Sampler._posterior_terms``) needs, per block of pieces, a draw for theta's
noise and then one for lambda's, each one ``normal_`` of the block's size from the sampler's
one generator. On a CPU the draw is serial and a large part of the step's extra time over
AdamW, while the block loop runs on one thread (see ``sampler.chain._one_thread_on_cpu``) and leaves
the other cores idle. With ``ahead``, a worker thread draws block k+1's noise while the loop
works on block k. One thread makes every draw, in the serial loop's order and at its sizes, so
the values and the generator's state after the step are the serial loop's, bit for bit: a chain
does not depend on whether the worker ran, and its checkpoints resume either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor


class BlockDraws:
    """One block's noise: :meth:`theta`, then :meth:`lam`, each called at most once and only
    for a kind whose noise is on. Drawn on demand into one buffer (a block's worth of
    temporary memory, as without this class) or handed over already drawn."""

    def __init__(self, generator: torch.Generator, buffer: Tensor | None,
                 ready: tuple[Tensor | None, Tensor | None] | None = None):
        self.generator, self.buffer, self.ready = generator, buffer, ready

    def theta(self) -> Tensor:
        return self.ready[0] if self.ready else self.buffer.normal_(generator=self.generator)

    def lam(self) -> Tensor:
        return self.ready[1] if self.ready else self.buffer.normal_(generator=self.generator)


class BlockNoise:
    """The draws of one step's blocks, in order (see the module's docstring)."""

    def __init__(self, generator: torch.Generator, block_sizes: list[int], *, theta: bool,
                 lam: bool, device: torch.device, dtype: torch.dtype):
        self.generator, self.block_sizes = generator, block_sizes
        self.kinds = (theta, lam)
        self.device, self.dtype = device, dtype
        self.pool: ThreadPoolExecutor | None = None
        self.ahead_buffers: list[list[Tensor | None]] | None = None

    def blocks(self, ahead: bool) -> Iterator[BlockDraws]:
        """Each block's draws in order; with ``ahead``, drawn one block ahead on a worker
        thread (torch's ops release the GIL while they run)."""
        if ahead and any(self.kinds):
            yield from self._ahead()
            return
        # allocated per step, so that it is free memory again during forward and backward
        buffer = torch.empty(max(self.block_sizes, default=0), device=self.device,
                             dtype=self.dtype)
        for n in self.block_sizes:
            yield BlockDraws(self.generator, buffer[:n])

    def _draw(self, k: int) -> tuple[Tensor | None, Tensor | None]:
        n = self.block_sizes[k]
        buffers = self.ahead_buffers[k % 2]
        theta, lam = (None if b is None else b[:n].normal_(generator=self.generator)
                      for b in buffers)
        return theta, lam

    def _ahead(self) -> Iterator[BlockDraws]:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sgld-noise")
            # two sets: the worker fills one while the loop reads the other
            largest = max(self.block_sizes)
            self.ahead_buffers = [
                [torch.empty(largest, device=self.device, dtype=self.dtype) if on else None
                 for on in self.kinds] for _ in range(2)]
        pending: Future | None = self.pool.submit(self._draw, 0)
        try:
            for k in range(len(self.block_sizes)):
                ready = pending.result()
                pending = (self.pool.submit(self._draw, k + 1)
                           if k + 1 < len(self.block_sizes) else None)
                yield BlockDraws(self.generator, None, ready)
        finally:
            if pending is not None:  # the loop stopped early: let the generator come to rest
                pending.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool, self.ahead_buffers = None, None
