"""train.best_metric / keep_best / validate_after_steps: the loop (training/loop.py) with the real Monitor and
checkpoint/best.py on a constructed metric sequence, the save stood in by a file-level one that commits as
save_checkpoint does (dir, manifest, `latest`, then checkpointing.rotated_out); the expected best is computed from
the sequence. Resume goes through loop.restore (load_checkpoint stood in by the stored state)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_speech.checkpoint import best as best_marker
from megatron_speech.checkpoint.checkpointing import LATEST, SaveError, checkpoint_dir, latest_step, rotated_out
from megatron_speech.checkpoint.integrity import MANIFEST
from megatron_speech.checkpoint.model_io import resolve
from megatron_speech.config.rules import BEST_METRICS
from megatron_speech.training import loop as loop_module
from megatron_speech.training.loop import Loop, TrainUnit, restore
from megatron_speech.training.monitor import Monitor
from megatron_speech.training.signals import EXIT_DONE, EXIT_PREEMPTED
from tests.fixtures import tiny_config

WER = [0.9, 0.5, 0.6, 0.7, 0.4, 0.8, 0.9, 0.95]  # best at 2, then 5


class Loader:
    def __init__(self, served: int = 0):
        self.served = served

    def __next__(self):
        self.served += 1
        return [{}]

    def state_dict(self):
        return {"served": self.served}

    def close(self):
        pass


class EvalUnit(TrainUnit):
    """Evaluation returns metrics[step - 1]."""

    has_evaluation = True

    def __init__(self, metrics: list[dict[str, float]], stop_at: int | None = None):
        self.metrics, self.stop_at, self.evaluated, self.next = metrics, stop_at, [], 0
        self.ddp = SimpleNamespace(ddp_config=SimpleNamespace(overlap_param_gather=False))
        self.optimizer = SimpleNamespace(get_loss_scale=lambda: 1.0, param_groups=[{"lr": 0.1}])
        self.scheduler = SimpleNamespace(step=lambda increment: None)

    def before_step(self, step):
        self.next = step + 1

    def train_step(self, batches, stop):
        return {"loss": 1.0, "finite": True, "nonfinite": None, "updated": True, "grad_norm": 1.0,
                "num_samples": 16_000, "stop": self.next == self.stop_at}

    def evaluate(self):
        self.evaluated.append(self.next)
        return dict(self.metrics[self.next - 1])


def _cfg(save_dir: Path, num_steps: int, *overrides: str, task: str = "asr"):
    return tiny_config(f"train.save_dir={save_dir}", f"finetune.task={task}", "data.speed_perturb=[]",
                       "train.perplexity_floor_evals=0", "train.eval_interval=1", "train.save_interval=2",
                       "train.keep_best=true", "train.keep_last=1", f"train.max_steps={num_steps}",
                       "train.early_stop_patience=0", "train.log_interval=1000", *overrides)


def _loop(cfg, unit, served: int = 0) -> Loop:
    monitor = Monitor(cfg, rank=0, num_codes=0)
    loop = Loop(cfg, unit, Loader(served), SimpleNamespace(enabled=False), monitor,
                SimpleNamespace(requested_here=False, signal_name="SIGUSR1"), {"step": 0})
    loop.writes = []

    def write(step: int, reshardable: bool) -> None:
        save_dir, path = Path(cfg.train.save_dir), checkpoint_dir(cfg.train.save_dir, step)
        # the invariant: whenever anything is written, `best` names a complete checkpoint
        marked = best_marker.best_step(save_dir)
        assert marked is None or best_marker.is_complete(save_dir, marked)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        (path / "metadata.json").write_text("{}")
        state = {"step": step, "monitor": loop.monitor.state_dict(), "loader": loop.loader.state_dict(),
                 **loop.unit.state_dict()}
        (path / "state.json").write_text(json.dumps(state))
        (path / MANIFEST).write_text("{}")  # save_checkpoint's commit: manifest, `latest`, then the rotation
        best_marker.write_marker(save_dir, LATEST, step)
        for old in rotated_out(save_dir, path, cfg.train.keep_last):
            shutil.rmtree(old)
        loop.writes.append((step, reshardable))

    loop.saves._write = write
    return loop


def _resume(cfg, unit, monkeypatch) -> tuple[Loop, int]:
    monkeypatch.setattr(loop_module, "load_checkpoint",
                        lambda path, *args: json.loads((Path(path) / "state.json").read_text()))
    monitor = Monitor(cfg, rank=0, num_codes=0)
    step, loader_state = restore(cfg.train, latest_step(cfg.train.save_dir), unit, SimpleNamespace(enabled=False),
                                 monitor)
    loop = _loop(cfg, unit, loader_state["served"])
    loop.monitor = loop.saves.monitor = monitor
    return loop, step


def _kept(save_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in save_dir.glob("iter_*"))


def _asr(wer: list[float]) -> list[dict[str, float]]:
    return [{"loss": 2.0 - 0.1 * i, "wer": w, "cer": w / 2} for i, w in enumerate(wer)]


def test_lower_better_best_is_saved_kept_apart_from_rotation_and_named(tmp_path):
    cfg = _cfg(tmp_path, len(WER))
    loop = _loop(cfg, EvalUnit(_asr(WER)))
    assert loop.run(0) == EXIT_DONE
    best = 1 + int(np.argmin(WER))
    assert loop.monitor.best == {"metric": "wer", "step": best, "value": min(WER)}
    # a save at each new best (1, 2, 5), the interval saves (4, 6, 8), never two at one step; the last reshardable
    assert loop.writes == [(1, False), (2, False), (4, False), (5, False), (6, False), (8, True)]
    assert best_marker.best_step(tmp_path) == best
    assert _kept(tmp_path) == [best, 8]  # keep_last=1 plus the best; the earlier best (2) deleted after the move
    assert resolve(tmp_path / "best") == checkpoint_dir(tmp_path, best)  # evaluate / embed / convert_to_hf
    assert resolve(tmp_path) == resolve(tmp_path / "latest") == checkpoint_dir(tmp_path, 8)


def test_higher_better_metric_and_ties(tmp_path):
    accuracy = [0.2, 0.5, 0.5, 0.4, 0.7, 0.6]
    cfg = _cfg(tmp_path, len(accuracy), "train.save_interval=0", "train.keep_last=2", task="speaker")
    loop = _loop(cfg, EvalUnit([{"loss": 1.0, "accuracy": a} for a in accuracy]))
    assert loop.run(0) == EXIT_DONE
    assert loop.monitor.best["step"] == 1 + int(np.argmax(accuracy)) == 5  # the tie at 3 is no improvement
    assert [s for s, _ in loop.writes] == [1, 2, 5, 6]
    assert best_marker.best_step(tmp_path) == 5 and _kept(tmp_path) == [5, 6]


def test_best_metric_names_another_metric_of_the_task(tmp_path):
    losses = [1.0, 0.8, 0.9, 0.7]  # wer gets worse, the loss better: train.best_metric=loss follows the loss
    cfg = _cfg(tmp_path, 4, "train.best_metric=loss", "train.save_interval=0")
    loop = _loop(cfg, EvalUnit([{"loss": v, "wer": 0.1 * (i + 1), "cer": 0.1} for i, v in enumerate(losses)]))
    loop.run(0)
    assert loop.monitor.best == {"metric": "loss", "step": 4, "value": 0.7}


def test_no_evaluation_before_validate_after_steps(tmp_path):
    cfg = _cfg(tmp_path, 8, "train.eval_interval=2", "train.validate_after_steps=4", "train.save_interval=0")
    unit = EvalUnit(_asr(WER))
    _loop(cfg, unit).run(0)
    assert unit.evaluated == [4, 6, 8]  # fairseq: num_updates >= validate_after_updates
    assert best_marker.best_step(tmp_path) == 4  # the 0.4 at step 5 was never evaluated


def test_early_stopping_watches_the_task_metric(tmp_path):
    wer = [0.5, 0.4, 0.45, 0.41, 0.3, 0.2]  # the loss improves every time (_asr): only the wer can stop the run
    cfg = _cfg(tmp_path / "wer", len(wer), "train.early_stop_patience=2")
    loop = _loop(cfg, EvalUnit(_asr(wer)))
    assert loop.run(0) == EXIT_DONE and loop.progress["step"] == 4
    assert loop.writes[-1] == (4, True)  # the early stop's save, reshardable
    assert best_marker.best_step(tmp_path / "wer") == 2
    cfg = _cfg(tmp_path / "loss", len(wer), "train.early_stop_patience=2", "train.best_metric=loss")
    loop = _loop(cfg, EvalUnit(_asr(wer)))
    assert loop.run(0) == EXIT_DONE and loop.progress["step"] == len(wer)


def _final(save_dir: Path, loop: Loop) -> tuple:
    return best_marker.best_step(save_dir), _kept(save_dir), loop.monitor.best, latest_step(save_dir)


def test_resume_keeps_the_best_and_the_marker(tmp_path, monkeypatch):
    whole = _loop(_cfg(tmp_path / "a", len(WER)), EvalUnit(_asr(WER)))
    whole.run(0)
    for stop_at in (3, 5, 6):  # between bests, at a best (one save: the best's), after the last best
        cfg = _cfg(tmp_path / f"b{stop_at}", len(WER))
        first = _loop(cfg, EvalUnit(_asr(WER), stop_at=stop_at))
        assert first.run(0) == EXIT_PREEMPTED
        assert [s for s, _ in first.writes].count(stop_at) == 1
        loop, step = _resume(cfg, EvalUnit(_asr(WER)), monkeypatch)
        assert step == stop_at and loop.monitor.best == first.monitor.best
        assert loop.run(step) == EXIT_DONE
        assert _final(tmp_path / f"b{stop_at}", loop) == _final(tmp_path / "a", whole)


def test_a_crash_between_the_best_save_and_the_marker(tmp_path, monkeypatch):
    whole = _loop(_cfg(tmp_path / "a", len(WER)), EvalUnit(_asr(WER)))
    whole.run(0)
    cfg = _cfg(tmp_path / "b", len(WER))
    real = loop_module.mark_best

    def crash_at_5(save_dir, step, keep_last):
        if step == 5:
            raise SystemExit("killed after the checkpoint of step 5, before `best` moved")
        real(save_dir, step, keep_last)

    monkeypatch.setattr(loop_module, "mark_best", crash_at_5)
    with pytest.raises(SystemExit):
        _loop(cfg, EvalUnit(_asr(WER))).run(0)
    monkeypatch.setattr(loop_module, "mark_best", real)
    assert latest_step(tmp_path / "b") == 5 and best_marker.best_step(tmp_path / "b") == 2
    assert best_marker.is_complete(tmp_path / "b", 2)  # the marker's checkpoint survived the rotation
    loop, step = _resume(cfg, EvalUnit(_asr(WER)), monkeypatch)
    assert best_marker.best_step(tmp_path / "b") == 5 and 2 not in _kept(tmp_path / "b")  # moved on resume
    loop.run(step)
    assert _final(tmp_path / "b", loop) == _final(tmp_path / "a", whole)


def _fake_checkpoint(save_dir: Path, step: int, complete: bool = True) -> None:
    path = checkpoint_dir(save_dir, step)
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    if complete:
        (path / MANIFEST).write_text("{}")


def test_the_marker_only_names_complete_checkpoints(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4, complete=False)  # a save that died before its commit
    best_marker.write_marker(tmp_path, LATEST, 2)
    best_marker.mark_best(tmp_path, 2, keep_last=1)
    assert (tmp_path / "best").read_text() == "2\n" and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(SaveError, match="not a complete checkpoint"):
        best_marker.mark_best(tmp_path, 4, keep_last=1)
    assert best_marker.best_step(tmp_path) == 2
    # resumed from step 3 after a fallback: a marker naming a later step (from the discarded run) goes
    _fake_checkpoint(tmp_path, 6)
    best_marker.write_marker(tmp_path, "best", 6)
    best_marker.reconcile(tmp_path, 3, None, keep_best=True, keep_last=1)
    assert best_marker.best_step(tmp_path) is None and 6 in _kept(tmp_path)  # left for that step's save to replace
    with pytest.raises(ValueError, match="kept no best checkpoint"):
        resolve(tmp_path / "best")


def test_best_metrics_are_what_the_evaluations_report():
    from megatron_speech.tasks.metrics import metrics, primary_metric, stat_names
    from megatron_speech.tasks.task import Task
    from megatron_speech.training.step import STATS, global_stats

    for name, labels in (("asr", ("a", "|")), ("phoneme", ("a",)), ("speaker", ("x", "y")), ("emotion", ("x", "y"))):
        task = Task(name, "key", labels)
        reported = metrics(task, {k: 1.0 for k in stat_names(task)})
        assert set(BEST_METRICS[name]) <= set(reported), name
        assert (next(iter(BEST_METRICS[name])), BEST_METRICS[name][primary_metric(task)[0]]) == primary_metric(task)
    assert set(BEST_METRICS["none"]) <= set(global_stats(torch.zeros(len(STATS)), 0.0, 0.0))


@pytest.mark.parametrize("overrides, message", [
    (["finetune.task=asr", "train.best_metric=accuracy"],
     r"train\.best_metric='accuracy' is not a validation metric of finetune\.task=asr: use one of wer, cer, loss"),
    (["train.best_metric=wer"], r"train\.best_metric='wer' is not a validation metric of pre-training: use one of "
                                r"loss, contrastive, accuracy"),
    (["train.keep_best=true", "train.eval_interval=0", "train.early_stop_patience=0"],
     r"train\.keep_best=true needs evaluations"),
    (["train.validate_after_steps=-1"], r"train\.validate_after_steps=-1 must be >= 0"),
])
def test_bad_best_settings_name_the_key(overrides, message):
    base = ["data.speed_perturb=[]", "train.perplexity_floor_evals=0"] if "finetune.task=asr" in overrides else []
    with pytest.raises(ValueError, match=message):
        tiny_config(*base, *overrides)


def test_pretraining_defaults_watch_the_valid_loss(tmp_path):
    monitor = Monitor(tiny_config(f"train.save_dir={tmp_path}"), rank=0, num_codes=32)
    assert (monitor.best_name, monitor.higher_is_better) == ("loss", False)
    monitor.load_state_dict({"best_valid": 1.5, "evals_without_improvement": 1})  # a checkpoint from before
    assert monitor.best["value"] == 1.5 and monitor.evals_without_improvement == 1
