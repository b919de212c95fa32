"""A model from a self-describing checkpoint directory (it stores the config it was trained with), and a model
written as a checkpoint. Used by the converters, `embed`, `evaluate` and `finetune`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_speech.checkpoint.checkpointing import (
    BEST,
    LATEST,
    checkpoint_dir,
    latest_step,
    load_checkpoint,
    save_checkpoint,
)
from megatron_speech.config import Config, config_from_dict

UNTRAINED = "untrained_weights"  # trainer-state key: weights a converter initialized rather than trained


def resolve(path: str | Path) -> Path:
    """A checkpoint directory: an iter_NNNNNNN/ folder itself, a save_dir (its `latest`), or a marker file in one:
    SAVE_DIR/best (train.keep_best's best checkpoint) or SAVE_DIR/latest."""
    path = Path(path)
    if (path / "metadata.json").exists():
        return path
    save_dir, name = (path.parent, path.name) if path.name in (LATEST, BEST) and path.is_file() else (path, LATEST)
    step = latest_step(save_dir, name)
    if step is not None:
        found = checkpoint_dir(save_dir, step)
        if not (found / "metadata.json").exists():
            raise ValueError(f"{save_dir / name} names step {step}, but {found} is not a complete checkpoint")
        return found
    if path.name == BEST:
        raise ValueError(f"{path} does not exist: that run kept no best checkpoint (train.keep_best=false or no "
                         "evaluation yet); pass the save_dir (its latest) or an iter_NNNNNNN/ folder")
    raise ValueError(f"{path} is neither a checkpoint (iter_NNNNNNN/ with metadata.json), a save_dir with a "
                     f"'{LATEST}' file, nor SAVE_DIR/{BEST}: pass one of those")


def checkpoint_config(path: str | Path) -> Config:
    """The config a checkpoint was trained with."""
    common = dist_checkpointing.load_common_state_dict(str(resolve(path)))
    try:
        return config_from_dict(common["trainer"]["config"], source=f"{path} (stored config)")
    except KeyError:
        raise ValueError(f"{path} stores no config: not a megatron-speech checkpoint") from None


def load_model_weights(path: str | Path, model: torch.nn.Module, use_ema: bool = False) -> dict:
    """Load the model's (or, with use_ema, the EMA's) weights into `model` at the current layout. Collective.
    Returns the stored trainer state."""
    path = resolve(path)
    if not use_ema:
        return load_checkpoint(path, model)
    averages = _StoredAverages(model)
    state = load_checkpoint(path, model, ema=averages)
    if not _has_ema(path):
        raise ValueError(f"{path} has no EMA weights (train.ema_decay was 0): drop --ema")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(averages.shadow[id(p)].to(p.dtype))
    return state


class _StoredAverages:
    """fp32 storage mirroring the parameters that load_checkpoint fills with a checkpoint's EMA (an Averages;
    reading the averages needs none of training's EMA updates)."""

    enabled = True

    def __init__(self, model: torch.nn.Module):
        self.shadow = {id(p): p.detach().float().clone() for p in model.parameters()}

    def by_param(self) -> dict[int, torch.Tensor]:
        return self.shadow


def _has_ema(path: Path) -> bool:
    return any(k.startswith("ema.") for k in dist_checkpointing.load_tensors_metadata(str(path)))


def save_model_only(save_dir: str | Path, model: torch.nn.Module, cfg: Config, step: int = 0,
                    untrained: Sequence[str] = ()) -> Path:
    """A checkpoint holding the model weights and the config (no optimizer): what convert_from_hf writes and
    train.init_checkpoint / finetune's `pretrained=` read. `untrained`: canonical keys of weights that were
    initialized, not trained (stored as the trainer state's "untrained_weights"; see untrained_heads)."""
    from megatron_speech.config import config_to_dict

    return save_checkpoint(save_dir, step, model, None, None, None,
                           {"config": config_to_dict(cfg), UNTRAINED: list(untrained)})


def untrained_heads(trainer_state: dict) -> list[str]:
    """The pre-training heads (quantizer, project_q, project_hid) a loaded checkpoint never trained: a converted
    encoder-only model. `trainer_state`: what load_model_weights returns."""
    return [k for k in trainer_state.get(UNTRAINED, []) if k.startswith(("quantizer.", "project_"))]


def world_is_single() -> bool:
    return not dist.is_initialized() or (dist.get_world_size() == 1 and
                                        parallel_state.get_tensor_model_parallel_world_size() == 1)
