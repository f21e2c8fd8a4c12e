"moebook.schedules: boundary values, continuity at phase boundaries, LambdaLR use, pickling, argument checks."
import math, pickle

import pytest
import torch

from moebook.schedules import (InfiniteSchedule, Phases, RelativeSchedule, Schedule, WarmupCosine, rewarm,
                               schedule_values)


def max_jump(sched, start, stop):
    return max(abs(sched(t) - sched(t - 1)) for t in range(start, stop))


@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 7), (1, 2), (4, 5), (10, 100)])
def test_warmup_cosine_boundaries(warmup, total):
    s = WarmupCosine(2e-3, total_steps=total, warmup_steps=warmup, lr_min=2e-4, lr_start=1e-4)
    assert s(0) == (1e-4 if warmup else 2e-3)
    assert s(warmup) == 2e-3
    assert s(total) == 2e-4 and s(total + 1000) == 2e-4
    vals = schedule_values(s, total + 3)
    assert all(2e-4 <= v <= 2e-3 for v in vals[1:])  # vals[0] is checked above
    up, down = vals[: warmup + 1], vals[warmup:]
    assert up == sorted(up) and down == sorted(down, reverse=True)


def test_warmup_cosine_matches_closed_form():
    s = WarmupCosine(1.0, total_steps=30, warmup_steps=10, lr_min=0.1)
    for t in range(10, 31):
        want = 0.1 + 0.45 * (1 + math.cos(math.pi * (t - 10) / 20))
        assert s(t) == pytest.approx(want, abs=1e-15)
    assert s(3) == pytest.approx(0.3, abs=1e-15)


def test_rewarm_is_continuous_and_reaches_new_peak():
    pre = WarmupCosine(3e-4, total_steps=200, warmup_steps=20, lr_min=3e-5)
    two = rewarm(pre, steps=100, warmup_steps=10, lr_max=2e-4, lr_min=1e-5)
    assert two.total_steps == 300 and two.starts == [0, 200]
    assert [two(t) for t in range(201)] == [pre(t) for t in range(201)]
    assert two(200) == pre(200) == 3e-5
    assert two(210) == 2e-4 and two(300) == 1e-5 and two(10_000) == 1e-5
    # continuity: the step into the boundary is no larger than one regular re-warm step
    assert abs(two(201) - two(200)) == pytest.approx((2e-4 - 3e-5) / 10, rel=1e-12)
    assert max_jump(two, 199, 202) <= (2e-4 - 3e-5) / 10 + 1e-18


def test_phases_chain_three_and_reject_unbounded_middle():
    a, b, c = WarmupCosine(1.0, 10), WarmupCosine(0.5, 5, lr_min=0.1), InfiniteSchedule(2, 3, 1.0, 0.5, 0.1)
    p = Phases((a, b, c))
    assert p.starts == [0, 10, 15] and p.total_steps is None
    assert p(9) == a(9) and p(10) == b(0) and p(15) == c(0) and p(10**6) == 0.5
    with pytest.raises(ValueError, match="phase 0 has no finite total_steps"):
        Phases((c, a))
    with pytest.raises(TypeError, match="phase 1 is not callable"):
        Phases((a, 3.0))


@pytest.mark.parametrize("shape", ["inv_sqrt", "cosine"])
def test_infinite_schedule_phases(shape):
    s = InfiniteSchedule(warmup_steps=20, cooldown_steps=80, cooldown=shape).with_anneal(start=300, steps=50)
    assert (s.lr_max, s.lr_const, s.lr_min) == (3e-4, 1.65e-4, 3e-5)  # documented defaults
    assert s(0) == 0.0 and s(20) == 3e-4
    assert s(100) == pytest.approx(1.65e-4, abs=1e-18) and s(299) == 1.65e-4 and s(300) == 1.65e-4
    assert s(350) == pytest.approx(3e-5, rel=1e-12) and s(10**6) == pytest.approx(3e-5, rel=1e-12)
    cooldown = schedule_values(s, 101)[20:]
    assert cooldown == sorted(cooldown, reverse=True)
    # continuity entering the constant phase and the anneal
    assert abs(s(100) - s(99)) <= (3e-4 - 1.65e-4) / 80
    ratio = (3e-5 / 1.65e-4) ** (1 / 50)  # per-step factor of the geometric anneal
    assert s(301) == pytest.approx(1.65e-4 * ratio, rel=1e-12)
    # geometric anneal: constant ratio between consecutive steps
    ratios = [s(t + 1) / s(t) for t in range(300, 350)]
    assert max(ratios) - min(ratios) < 1e-12


def test_inverse_sqrt_cooldown_is_front_loaded_versus_cosine():
    inv, cos = InfiniteSchedule(0, 100), InfiniteSchedule(0, 100, cooldown="cosine")
    assert inv(0) == cos(0) == inv.lr_max
    assert all(inv(t) < cos(t) for t in range(1, 91))  # drops faster at first, for most of the cooldown
    assert sum(schedule_values(inv, 100)) < 0.95 * sum(schedule_values(cos, 100))
    for sched in (inv, cos):  # both end at lr_const, without a jump onto it
        assert abs(sched(99) - sched.lr_const) < 0.01 * (sched.lr_max - sched.lr_const)
        assert sched(100) == sched.lr_const


def test_infinite_without_anneal_never_ends():
    s = InfiniteSchedule(5, 5)
    assert s.total_steps is None and s(10**9) == s.lr_const
    with pytest.raises(ValueError, match="finite total_steps"):
        rewarm(s, 10, 2, 1e-4)


def test_lambda_lr_reproduces_schedule_and_survives_state_dict():
    s = rewarm(WarmupCosine(1e-3, 8, 2, lr_min=1e-4), steps=6, warmup_steps=2, lr_max=5e-4)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, s.relative_to(1e-3))
    got, saved = [], None
    for t in range(16):
        if t == 9:  # mid re-warm: a checkpoint of the optimizer and the scheduler, through pickle
            saved = pickle.loads(pickle.dumps((opt.state_dict(), lam.state_dict())))
        got.append(opt.param_groups[0]["lr"]); opt.step(); lam.step()
    assert got == pytest.approx([s(t) for t in range(16)], abs=1e-18)
    assert len(set(got[9:12])) == 3  # the resumed part of the schedule still changes, so the check below is sensitive
    # a fresh optimizer and LambdaLR loaded from the checkpoint continue the same schedule
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    lam2 = torch.optim.lr_scheduler.LambdaLR(opt2, s.relative_to(1e-3))
    opt2.load_state_dict(saved[0]); lam2.load_state_dict(saved[1])
    resumed = []
    for _ in range(9, 16):
        resumed.append(opt2.param_groups[0]["lr"]); opt2.step(); lam2.step()
    assert resumed == pytest.approx(got[9:], abs=1e-18)


def test_schedules_pickle_and_compare_by_value():
    for s in (WarmupCosine(1e-3, 10, 2), InfiniteSchedule(1, 2).with_anneal(5, 5),
              rewarm(WarmupCosine(1e-3, 10), 5, 1, 1e-3), RelativeSchedule(WarmupCosine(1e-3, 10), 1e-3)):
        t = pickle.loads(pickle.dumps(s))
        assert t == s and [t(i) for i in range(15)] == [s(i) for i in range(15)]


@pytest.mark.parametrize("make,msg", [
    (lambda: WarmupCosine(1e-3, total_steps=10, warmup_steps=11), "warmup_steps (11) must be < total_steps (10)"),
    (lambda: WarmupCosine(1e-3, total_steps=-5), "total_steps must be >= 1"),
    (lambda: WarmupCosine(1e-3, total_steps=5, warmup_steps=5), "warmup_steps (5) must be < total_steps (5)"),
    (lambda: WarmupCosine(1e-3, total_steps=10, warmup_steps=-1), "warmup_steps must be >= 0"),
    (lambda: WarmupCosine(1e-4, total_steps=10, lr_min=1e-3), "lr_min (0.001) must be <= lr_max (0.0001)"),
    (lambda: WarmupCosine(1e-4, total_steps=10, lr_start=1e-3), "lr_start (0.001) must be <= lr_max"),
    (lambda: WarmupCosine(float("inf"), total_steps=10), "lr_max must be a finite number"),
    (lambda: WarmupCosine(1e-3, total_steps=10.0), "total_steps must be an int, got float"),
    (lambda: WarmupCosine(1e-3, total_steps=True), "total_steps must be an int, got bool"),
    (lambda: InfiniteSchedule(10, 10, lr_min=2e-4), "need lr_min <= lr_const <= lr_max"),
    (lambda: InfiniteSchedule(10, 10, cooldown="step"), "cooldown must be one of"),
    (lambda: InfiniteSchedule(10, 10, cooldown_alpha=0.0), "cooldown_alpha must be > 0"),
    (lambda: InfiniteSchedule(10, 10, anneal_start=15, anneal_steps=5), "anneal_start (15) must be >= warmup_steps + cooldown_steps (20)"),
    (lambda: InfiniteSchedule(10, 10, anneal_start=25), "anneal_steps >= 1"),
    (lambda: InfiniteSchedule(10, 10, lr_min=0.0, anneal_start=25, anneal_steps=3), "lr_min > 0"),
    (lambda: RelativeSchedule(WarmupCosine(1e-3, 10), 0.0), "base_lr must be > 0"),
])
def test_bad_arguments_raise_clear_errors(make, msg):
    with pytest.raises((ValueError, TypeError)) as e:
        make()
    assert msg in str(e.value)


def test_bad_steps_raise():
    s = WarmupCosine(1e-3, 10)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        s(-1)
    with pytest.raises(TypeError, match="step must be an int"):
        s(1.5)
    assert s(torch.tensor(3).item()) == s(3)
    assert isinstance(s, Schedule)
