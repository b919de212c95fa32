"""Checkpoints reshard: written at TP=2/DP=1, loaded at TP=1/DP=2 and back, with model, optimizer and EMA (saves
made with reshardable=True); a routine save reloads at another DP size, each DP rank writing its share with no
all-gather of the optimizer state, and at another TP size is a clear error."""

from __future__ import annotations

import torch

from tests.dist import run_ranks
from tests.runs import setup_training, train_one_step


def _snapshot(model, ema):
    from megatron_speech.models.wav2vec2 import interop

    backup = ema.copy_to()
    averaged = interop.canonical_state_dict(model)
    ema.restore(backup)
    return interop.canonical_state_dict(model), averaged


def _write(rank, world, tp, save_dir, reshardable=True):
    from megatron_speech.checkpoint.checkpointing import save_checkpoint

    cfg, model, ddp, opt, sched, ema, dp_rank, dp = setup_training(tp)
    for step in (1, 2):
        train_one_step(cfg, ddp, opt, sched, ema, step, dp_rank, dp)
    saved = _snapshot(model, ema)
    save_checkpoint(save_dir, 2, ddp, opt, sched, ema, {"consumed": 2}, keep_last=2, reshardable=reshardable)
    loss3 = train_one_step(cfg, ddp, opt, sched, ema, 3, dp_rank, dp)
    return saved, loss3, _snapshot(model, ema), sched.get_lr(opt.param_groups[0])


def _read(rank, world, tp, save_dir, step, save_after, reshardable=True):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_speech.checkpoint.checkpointing import checkpoint_dir, load_checkpoint, save_checkpoint

    cfg, model, ddp, opt, sched, ema, dp_rank, dp = setup_training(tp)
    trainer = load_checkpoint(checkpoint_dir(save_dir, step), ddp, opt, sched, ema)
    loaded = _snapshot(model, ema)
    loss = train_one_step(cfg, ddp, opt, sched, ema, step + 1, dp_rank, dp)
    after = _snapshot(model, ema)
    if save_after and reshardable:
        save_checkpoint(save_dir, step + 1, ddp, opt, sched, ema, {"consumed": step + 1}, reshardable=True)
    elif save_after:
        # a routine save must not gather the whole optimizer state onto the ranks (megatron's fully_reshardable
        # path does, through get_parameter_state_dp_zero)
        def gather(*args, **kwargs):
            raise AssertionError("a routine save all-gathered the optimizer state (get_parameter_state_dp_zero)")

        DistributedOptimizer.get_parameter_state_dp_zero = gather
        save_checkpoint(save_dir, step + 1, ddp, opt, sched, ema, {"consumed": step + 1})
    return trainer, loaded, loss, after, sched.get_lr(opt.param_groups[0])


def _assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_close(a: dict, b: dict):
    for k in a:
        scale = b[k].abs().max().clamp(min=1e-12)
        assert (a[k] - b[k]).abs().max() <= 1e-5 * scale, k


def test_tp2_checkpoint_loads_at_dp2_and_back(tmp_path):
    save_dir = str(tmp_path)
    written = run_ranks(_write, 2, 2, save_dir)  # TP=2, DP=1
    (saved, saved_ema), loss3, (after3, after3_ema), lr3 = written[0]

    read = run_ranks(_read, 2, 1, save_dir, 2, True)  # TP=1, DP=2
    for trainer, (loaded, loaded_ema), loss, (after, after_ema), lr in read:
        assert trainer["consumed"] == 2 and trainer["step"] == 2
        _assert_equal(loaded, saved)  # model weights: exact
        _assert_equal(loaded_ema, saved_ema)  # EMA: exact
        # the optimizer moments and the scheduler came along: the next step matches the run that never moved
        assert abs(loss - loss3) <= 1e-5 * abs(loss3)
        _assert_close(after, after3)
        _assert_close(after_ema, after3_ema)
        assert lr == lr3

    back = run_ranks(_read, 2, 2, save_dir, 3, False)  # and back to TP=2, DP=1
    for trainer, (loaded, loaded_ema), _, _, _ in back:
        assert trainer["step"] == 3
        _assert_equal(loaded, read[0][3][0])
        _assert_equal(loaded_ema, read[0][3][1])


def _read_with_plain_optimizer(rank, world, save_dir):
    from megatron_speech.checkpoint.checkpointing import checkpoint_dir, load_checkpoint

    cfg, model, ddp, opt, sched, ema, _, _ = setup_training(1, distributed_optimizer=False)
    try:
        load_checkpoint(checkpoint_dir(save_dir, 2), ddp, opt, sched, ema)
    except ValueError as e:
        return str(e)
    return None


def test_optimizer_format_mismatch_is_a_clear_error(tmp_path):
    # megatron's distributed and plain optimizers store Adam's state differently; resuming one from the other
    # would die in dist_checkpointing with a missing key
    run_ranks(_write, 1, 1, str(tmp_path))
    (message,) = run_ranks(_read_with_plain_optimizer, 1, str(tmp_path))
    assert message and "parallel.use_distributed_optimizer=True run" in message and "init_checkpoint" in message


def _read_expecting_error(rank, world, tp, save_dir, step):
    from megatron_speech.checkpoint.checkpointing import checkpoint_dir, load_checkpoint

    cfg, model, ddp, opt, sched, ema, _, _ = setup_training(tp)
    try:
        load_checkpoint(checkpoint_dir(save_dir, step), ddp, opt, sched, ema)
    except ValueError as e:
        return str(e)
    return None


def test_routine_checkpoint_loads_at_another_dp_each_rank_writing_its_share(tmp_path):
    save_dir = str(tmp_path)
    (saved, saved_ema), loss3, (after3, after3_ema), lr3 = run_ranks(_write, 1, 1, save_dir, False)[0]  # TP1 DP1

    read = run_ranks(_read, 2, 1, save_dir, 2, True, False)  # TP=1, DP=2; saves step 3 routinely
    for trainer, (loaded, loaded_ema), loss, (after, after_ema), lr in read:
        assert trainer["step"] == 2
        _assert_equal(loaded, saved)
        _assert_equal(loaded_ema, saved_ema)
        assert abs(loss - loss3) <= 1e-5 * abs(loss3)  # the optimizer state resharded over DP came along
        _assert_close(after, after3)
        _assert_close(after_ema, after3_ema)
        assert lr == lr3

    # Each DP rank wrote its share of step 3 (torch_dist names a rank's files __RANK_N.distcp): the optimizer
    # shard it holds and half of the replicated model and EMA, not rank 0 everything.
    from megatron_speech.checkpoint.checkpointing import checkpoint_dir

    per_rank = [sum(f.stat().st_size for f in checkpoint_dir(save_dir, 3).glob(f"__{r}_*.distcp")) for r in (0, 1)]
    print(f"\nFIGURE bytes written per rank at DP=2 (tiny): {per_rank}")
    assert min(per_rank) >= 0.35 * sum(per_rank), per_rank

    # A routine save reloads only at the TP size that wrote it: a clear error, not a missing key
    messages = run_ranks(_read_expecting_error, 2, 2, save_dir, 3)
    assert messages[0] == messages[1]
    assert messages[0] and "only at TP=1, not TP=2" in messages[0] and "reshardable=True" in messages[0]
