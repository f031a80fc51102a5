"""fullscale.health's rules on synthetic sequences: each detector fires on what it is for and
stays quiet on what a healthy run looks like (noise, a falling loss, clipped outliers)."""

import math
import random

import pytest

from fullscale.config import Config
from fullscale.health import HealthMonitor


def monitor(total_steps=1000, warmup_steps=50, **settings):
    return HealthMonitor(Config(**settings), total_steps=total_steps, warmup_steps=warmup_steps)


def feed(m, losses, norms=None, start=1):
    """Every step through check_step; returns the events."""
    events = []
    norms = norms or [1.0] * len(losses)
    for i, (loss, norm) in enumerate(zip(losses, norms)):
        events += m.check_step(step=start + i, loss=loss, grad_norm=norm)
    return events


def falling(n, seed=0, start=3.0, end=1.0, noise=0.02):
    rng = random.Random(seed)
    return [start + (end - start) * i / n + rng.gauss(0, noise) for i in range(n)]


def test_a_noisy_falling_loss_raises_nothing():
    m = monitor()
    assert feed(m, falling(400), [1.0 + 0.1 * random.Random(i).random() for i in range(400)]) == []


def test_a_spike_above_the_recent_level_is_a_rollback_and_does_not_move_the_baseline():
    m = monitor()
    feed(m, falling(100))
    level = m.losses[-1]
    [event] = m.check_step(step=101, loss=level * 3, grad_norm=1.0)
    assert event.detector == "spike" and event.action == "rollback" and event.value == pytest.approx(level * 3)
    assert m.losses[-1] == level          # a rejected update leaves the statistics as they were
    assert m.check_step(step=102, loss=level, grad_norm=1.0) == []


def test_a_spike_after_the_allowed_rollbacks_aborts_and_the_rule_can_be_off():
    m = monitor(health_max_rollbacks=1)
    feed(m, falling(60))
    m.num_rollbacks = 1
    [event] = m.check_step(step=61, loss=50.0, grad_norm=1.0)
    assert event.action == "abort"
    off = monitor(health_spike_threshold=0)
    feed(off, falling(60))
    assert off.check_step(step=61, loss=50.0, grad_norm=1.0) == []


def test_small_wiggles_of_a_nearly_flat_loss_are_not_spikes():
    m = monitor()
    feed(m, [0.010 + 0.0001 * (i % 3) for i in range(60)])
    assert m.check_step(step=61, loss=0.013, grad_norm=1.0) == []   # under the minimum ratio and nats


def test_non_finite_values_skip_then_abort_after_k_in_a_row_and_a_good_step_resets_the_count():
    m = monitor(health_max_nonfinite=3)
    assert [e.action for e in feed(m, [math.nan, math.inf])] == ["skip", "skip"]
    assert feed(m, [1.0], start=3) == [] and m.consecutive_nonfinite == 0
    actions = [e.action for e in feed(m, [1.0], [math.nan], start=4) + feed(m, [math.nan] * 2, start=5)]
    assert actions == ["skip", "skip", "abort"]
    assert monitor(health_nonfinite_action="abort").check_step(step=1, loss=math.nan, grad_norm=1.0)[0].action == "abort"


def test_an_exploding_gradient_is_reported_but_a_clipped_outlier_within_the_window_is_not():
    m = monitor()
    norms = [1.0 + 0.05 * (i % 5) for i in range(60)]
    norms[30] = 8.0   # one large norm inside the window: heavy tails, clipped anyway
    assert feed(m, falling(60), norms) == []
    [event] = m.check_step(step=61, loss=m.losses[-1], grad_norm=40.0)
    assert event.detector == "grad" and event.action == "warn"
    assert m.check_step(step=62, loss=m.losses[-1], grad_norm=15.0) == []   # not 2x the window's largest


def test_a_learning_rate_that_collapses_long_before_the_end_warns_once():
    m = monitor(total_steps=1000, warmup_steps=50)
    assert all(m.check_lr(step=s, lr=2e-4) == [] for s in range(1, 300))
    [event] = m.check_lr(step=300, lr=1e-7)
    assert event.detector == "lr" and "long before the end" in event.message
    assert m.check_lr(step=301, lr=1e-8) == []   # one warning
    late = monitor(total_steps=1000, warmup_steps=50)
    late.check_lr(step=100, lr=2e-4)
    assert late.check_lr(step=990, lr=1e-8) == []   # the end of a decaying schedule is not a collapse


def test_memory_that_grows_past_the_allowed_share_is_a_leak_and_a_steady_level_is_not():
    steady = monitor(health_memory_window=5)
    assert all(steady.check_memory(step=s, memory_gb=2.0 + 0.01 * (s % 3)) == [] for s in range(60))
    growing = monitor(health_memory_window=5, health_memory_growth=0.2)
    events = [e for s in range(40) for e in growing.check_memory(step=s, memory_gb=2.0 + 0.05 * s)]
    assert [e.detector for e in events] == ["memory"] and "keeps growing" in events[0].message
    assert growing.check_memory(step=41, memory_gb=math.nan) == []


def test_overfitting_needs_eval_rising_while_train_falls_and_warns_again_after_a_recovery():
    m = monitor(health_overfit_evals=3)
    seq = [(1, 2.0, None), (2, 2.1, 1.9), (3, 2.2, 1.8)]
    assert all(m.check_eval(step=s, eval_loss=e, train_loss=t) == [] for s, e, t in seq)
    [event] = m.check_eval(step=4, eval_loss=2.3, train_loss=1.7)
    assert event.detector == "overfit" and event.action == "warn"
    assert m.check_eval(step=5, eval_loss=2.4, train_loss=1.6) == []          # one warning per episode
    m.check_eval(step=6, eval_loss=1.5, train_loss=1.5)                         # a new best: the episode ends
    for s, e, t in ((7, 1.6, 1.4), (8, 1.7, 1.3)):
        assert m.check_eval(step=s, eval_loss=e, train_loss=t) == []
    assert m.check_eval(step=9, eval_loss=1.8, train_loss=1.2)[0].detector == "overfit"
    both = monitor(health_overfit_evals=3)
    for s, e in enumerate((2.0, 2.1, 2.2, 2.3)):
        assert both.check_eval(step=s, eval_loss=e, train_loss=2.0 + 0.1 * s) == []   # train rising too


def test_the_state_round_trips_so_a_resume_decides_as_the_run_would_have():
    a = monitor()
    feed(a, falling(80))
    a.check_lr(step=80, lr=1e-4)
    a.check_eval(step=80, eval_loss=1.2, train_loss=1.1)
    b = monitor()
    b.load_state_dict(a.state_dict())
    for step, loss, norm in ((81, 1.0, 1.0), (82, 9.0, 1.0), (83, 1.0, 30.0)):
        assert a.check_step(step=step, loss=loss, grad_norm=norm) == b.check_step(step=step, loss=loss, grad_norm=norm)
    assert a.state_dict() == b.state_dict()
