"""training/loop.py on stand-ins: what the loop does around a unit's step, without a model or process group."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_speech.training.loop import Loop, TrainUnit
from megatron_speech.training.signals import EXIT_DONE, EXIT_PREEMPTED


class Loader:
    def __init__(self):
        self.closed, self.served = 0, 0

    def __next__(self):
        self.served += 1
        return [{}]

    def state_dict(self):
        return {"served": self.served}

    def close(self):
        self.closed += 1


class Unit(TrainUnit):
    def __init__(self, fail_at: int | None = None, stop_at: int | None = None):
        self.ddp = None
        self.optimizer = SimpleNamespace(get_loss_scale=lambda: 1.0, param_groups=[{"lr": 0.1}])
        self.scheduler = SimpleNamespace(steps=0)
        self.scheduler.step = lambda increment: setattr(self.scheduler, "steps", self.scheduler.steps + increment)
        self.fail_at, self.stop_at, self.seen = fail_at, stop_at, []

    def before_step(self, step):
        self.seen.append(step)

    def train_step(self, batches, stop):
        if len(self.seen) == self.fail_at:
            raise RuntimeError("a step failed")
        return {"loss": 1.0, "finite": True, "nonfinite": None, "updated": True, "grad_norm": 1.0,
                "num_samples": 16_000, "stop": len(self.seen) == self.stop_at}


class Monitor:
    def __init__(self):
        self.logged = []
        self.best = {"metric": "loss", "step": None, "value": None}

    def train_step(self, step, out, lr, loss_scale, values, shown):
        self.logged.append(step)

    def check_step(self, out, loss_scale, step):
        return None

    def state_dict(self):
        return {}

    def alarm(self, step, message):
        raise AssertionError(message)

    def close(self):
        pass


def _loop(unit, loader, tmp_path):
    train = SimpleNamespace(max_steps=3, eval_interval=0, save_interval=0, keep_last=2, on_save_error="stop",
                            exit_on_signal=True, save_dir=str(tmp_path), keep_best=False, validate_after_steps=0)
    loop = Loop(SimpleNamespace(train=train), unit, loader, SimpleNamespace(enabled=False), Monitor(),
                SimpleNamespace(requested_here=False, signal_name="SIGUSR1"), {"step": 0})
    saved = []
    loop.saves._write = lambda step, reshardable: saved.append((step, reshardable))
    return loop, saved


def test_the_loop_steps_schedules_saves_and_stops_the_workers(tmp_path):
    unit, loader = Unit(), Loader()
    loop, saved = _loop(unit, loader, tmp_path)
    assert loop.run(0) == EXIT_DONE
    assert unit.seen == [0, 1, 2] and unit.scheduler.steps == 3 and loop.progress["step"] == 3
    assert loop.monitor.logged == [1, 2, 3]
    assert saved == [(3, True)]  # the final save, reshardable
    assert loader.closed == 1  # workers stopped before the process exits (they ignore SIGTERM)


def test_a_stop_signal_saves_and_exits_75(tmp_path):
    unit, loader = Unit(stop_at=2), Loader()
    loop, saved = _loop(unit, loader, tmp_path)
    assert loop.run(0) == EXIT_PREEMPTED
    assert saved == [(2, False)] and loader.closed == 1


def test_the_workers_are_stopped_when_a_step_raises(tmp_path):
    unit, loader = Unit(fail_at=2), Loader()
    loop, _ = _loop(unit, loader, tmp_path)
    with pytest.raises(RuntimeError, match="a step failed"):
        loop.run(0)
    assert loader.closed == 1
