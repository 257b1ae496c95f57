"""The linear warm-up schedule is transformers' own, step for step (it is written out in
bayestune.optim only so that a job does not pay for importing transformers' trainer)."""

from __future__ import annotations

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from bayestune.optim import jiant_schedule, linear_schedule_with_warmup


def _rates(make, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 10), (10, 10), (4, 7), (0, 0)])
def test_linear_schedule_is_transformers(warmup, total):
    ours = _rates(lambda o: linear_schedule_with_warmup(o, warmup, total), total + 3)
    theirs = _rates(lambda o: get_linear_schedule_with_warmup(o, warmup, total), total + 3)
    assert ours == pytest.approx(theirs, abs=0, rel=1e-15)


def test_jiant_schedule_ramps_over_a_tenth_of_its_epochs():
    rates = _rates(lambda o: jiant_schedule(o, epochs=10, steps_per_epoch=3, warmup_ratio=0.1),
                   31)
    assert rates[:4] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    assert rates[30] == 0.0 and rates[29] > 0


def test_a_resumed_schedule_continues_where_it_stopped():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    first = linear_schedule_with_warmup(optimizer, 4, 20)
    for _ in range(6):
        optimizer.step()
        first.step()
    again = linear_schedule_with_warmup(optimizer, 4, 20)
    again.load_state_dict(first.state_dict())
    assert again.get_last_lr() == first.get_last_lr() == [pytest.approx(14 / 16)]
