"""Welford running mean (and M2) of the lambda samples, kept out of process memory off the GPU.

The statistics are as large as the model (twice over with M2, which only the variance needs);
on the CPU they would add to stage 1's peak memory, so they live in an unnamed scratch file
updated block by block with explicit reads and writes (mmap'd pages would count as resident
again).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from bayestune import files

STATS_BLOCK = 1 << 16  # scalars per block of the update (and its I/O)
# How a checkpoint stores the running statistics, by checkpoint_precision.
STORED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class RunningStats:
    """Welford's running mean and, with ``variance``, M2 (float32, flat) of the lambda samples.

    Off the GPU they sit in an anonymous scratch file, not in memory: the sampler already holds
    ~6x the model besides what plain fine-tuning holds, the statistics would add 2x more, and
    they are touched once every ``thinning`` steps. An update reads and writes the file block
    by block with pread/pwrite into one block buffer (not mmap, whose pages would count as the
    process's own); between updates the data is only in the OS page cache, which can drop it.
    With a GPU the host has the room, so the statistics stay in host memory there.
    Layout: the mean of all scalars, then their M2 (region 0 and region 1).
    """

    REGIONS = ("running_mean", "running_m2")  # also the names of the checkpoint attachments

    def __init__(self, numel: int, *, in_memory: bool, directory: Path | None = None,
                 variance: bool = True) -> None:
        self.numel, self.count = numel, 0
        self.regions = self.REGIONS[:2 if variance else 1]
        rows = len(self.regions)
        self.memory = torch.zeros(rows, numel, dtype=torch.float32) if in_memory else None
        self.file = None if in_memory else _scratch_file(4 * rows * numel, directory)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def _spans(self) -> Iterable[tuple[int, int]]:
        return ((a, min(a + STATS_BLOCK, self.numel)) for a in range(0, self.numel, STATS_BLOCK))

    def _read(self, region: int, start: int, out: Tensor) -> Tensor:
        """Scalars ``start:start + len(out)`` of a region (in ``out`` or a view of memory)."""
        if self.memory is not None:
            return self.memory[region, start:start + out.numel()]
        _pread_exact(self.file.fileno(), out, 4 * (region * self.numel + start))
        return out

    def _write(self, region: int, start: int, values: Tensor) -> None:
        if self.memory is not None:
            self.memory[region, start:start + values.numel()].copy_(values)
        else:
            _pwrite_all(self.file.fileno(), values, 4 * (region * self.numel + start))

    def add(self, sample: Callable[[int, int], Tensor]) -> None:
        """Add one sample; ``sample(start, stop)`` gives its float32 CPU values there."""
        self.count += 1
        variance = len(self.regions) == 2
        buffer = torch.empty(len(self.regions), min(STATS_BLOCK, self.numel),
                             dtype=torch.float32)
        for start, stop in self._spans():
            x = sample(start, stop)
            mean = self._read(0, start, buffer[0, :stop - start])
            delta = x - mean
            mean.add_(delta, alpha=1.0 / self.count)
            if variance:
                m2 = self._read(1, start, buffer[1, :stop - start])
                m2.addcmul_(delta, x.sub_(mean))
            if self.memory is None:
                self._write(0, start, mean)
                if variance:
                    self._write(1, start, m2)

    def region(self, region: int) -> Tensor:
        """A new tensor with the whole region (the final result needs it once)."""
        out = torch.empty(self.numel, dtype=torch.float32)
        for start, stop in self._spans():
            view = out[start:stop]
            got = self._read(region, start, view)
            if got is not view:
                view.copy_(got)
        return out

    def writer(self, region: int, dtype: torch.dtype = torch.float32
               ) -> Callable[[BinaryIO], None]:
        """Streams the region's raw bytes (as ``dtype``) to a binary file, block by block."""
        def write(out: BinaryIO) -> None:
            buffer = torch.empty(min(STATS_BLOCK, self.numel), dtype=torch.float32)
            for start, stop in self._spans():
                values = self._read(region, start, buffer[:stop - start])
                out.write(_bytes(values.to(dtype).view(torch.int16) if dtype != torch.float32
                                 else values))
        return write

    def load(self, region: int, stream: BinaryIO, where: Path,
             dtype: torch.dtype = torch.float32) -> None:
        """Fill the region from the raw bytes that :meth:`writer` wrote as ``dtype``."""
        buffer = torch.empty(min(STATS_BLOCK, self.numel), dtype=dtype)
        for start, stop in self._spans():
            chunk = buffer[:stop - start]
            raw = chunk.view(torch.int16) if dtype != torch.float32 else chunk
            if _readinto_exact(stream, _bytes(raw)) < chunk.element_size() * chunk.numel():
                raise files.FileFormatError(f"{where}: {self.REGIONS[region]} is shorter than "
                                            "the model; delete the checkpoint to start over")
            self._write(region, start, chunk.float())
        if stream.read(1):
            raise files.FileFormatError(f"{where}: {self.REGIONS[region]} is longer than the "
                                        "model; delete the checkpoint to start over")


def _scratch_file(size: int, directory: Path | None) -> BinaryIO:
    """An anonymous file of ``size`` zero bytes (gone when closed, or when the process dies)."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryFile(dir=directory)
    try:
        os.posix_fallocate(scratch.fileno(), 0, size)  # a full disk fails now, not mid-run
    except OSError as err:
        scratch.close()
        where = directory or tempfile.gettempdir()
        raise OSError(err.errno, f"no room for the {size >> 20} MiB scratch file of the running "
                      f"statistics in {where} ({err.strerror}); free space there, or put the "
                      "checkpoint (or TMPDIR without one) on a larger disk") from err
    return scratch


def _bytes(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared, as buffer-protocol I/O wants them."""
    return memoryview(t.numpy()).cast("B")


def _readinto_exact(stream: BinaryIO, view: memoryview) -> int:
    done = 0
    while done < len(view):
        got = stream.readinto(view[done:])
        if not got:
            break
        done += got
    return done


def _pread_exact(fd: int, out: Tensor, offset: int) -> None:
    view, done = _bytes(out), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"scratch file of the running statistics ends at byte {offset + done}")
        done += got


def _pwrite_all(fd: int, values: Tensor, offset: int) -> None:
    view, done = _bytes(values), 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)
