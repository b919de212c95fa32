"""The whole run's configuration: the root dataclass of sections, its validation (each section's own rules, then
the cross-section ones, in one ValueError) and the loaders bound to it (YAML presets, overrides, stored dicts).

    cfg = load_config("configs/xl.yaml", ["train.max_steps=1000", "data.prefix=/data/en"])
    cfg.validate(world_size=32)          # before any process group forms
    d = config_to_dict(cfg)              # plain JSON/YAML types; stored inside checkpoints
    assert config_from_dict(d) == cfg

A YAML file is a mapping of sections (`model`, `data`, `optim`, `train`, `parallel`, `logging`, `finetune`) to
the keys it changes (engine.py says how keys and values are checked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_speech.config import engine, rules
from megatron_speech.config.schema import (
    DataConfig,
    FinetuneConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    model_problems,
)
from megatron_speech.models.wav2vec2.config import Wav2Vec2Config


@dataclass
class Config:
    """A whole run: model and objective, data, optimizer, training loop, parallel layout, logging."""

    model: Wav2Vec2Config = field(default_factory=Wav2Vec2Config)
    """Architecture and pre-training objective."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, batching, augmentation."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop, checkpoints, alarms."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics destinations."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Fine-tuning task and head (python -m megatron_speech.finetune); unused by pre-training."""

    def validate(self, world_size: int | None = None) -> None:
        """Check every section's rules and the cross-section ones; raise one ValueError listing every problem
        (each names its dotted key).

        world_size: total ranks, when known (before process groups form): TP must divide it.
        """
        engine.finite_problems(self).raise_if_any()  # the other rules' arithmetic needs finite numbers
        problems = engine.Problems()
        problems += model_problems(self.model)
        problems += rules.tensor_parallel_problems(self, world_size)
        problems += self.parallel.problems()
        problems += self.data.problems()
        problems += rules.masking_problems(self)
        problems += self.optim.problems()
        problems += self.train.problems()
        problems += rules.recompute_problems(self)
        problems += rules.training_problems(self)
        problems += self.finetune.problems()
        problems += rules.finetune_problems(self)
        problems += engine.choice_problems(self)
        problems.raise_if_any()

    def after_assignments(self, keys: set[str]) -> None:
        """Called by the engine with the keys one source set."""
        # mask_length (frames) and mask_length_ms are two units of one quantity, and ms wins inside the model
        # config; make the last source win instead: a source that sets only the frames clears an earlier ms.
        if "model.mask_length" in keys and "model.mask_length_ms" not in keys:
            self.model.mask_length_ms = None


def sections() -> dict[str, type]:
    """Section name -> section dataclass, in declaration order."""
    return engine.sections(Config)


def all_keys() -> list[str]:
    """Every dotted key, `section.field`, in declaration order."""
    return engine.all_keys(Config)


def load_config(path: str | None, overrides: Sequence[str] = (), base: Config | None = None,
                validate: bool = True) -> Config:
    """Dataclass defaults (or a copy of `base`), then the YAML file at path (if any), then each `section.key=value`
    in order.

    Returns a Config that passed validate() without a world size (unless validate=False, for a first look at a
    few keys); call cfg.validate(world_size) once known. Fine-tuning passes the pretrained checkpoint's config as
    `base`, so the file and overrides apply on top of its model section.
    Raises ValueError for unknown keys, wrong types and broken rules, naming the dotted key.
    """
    cfg = engine.load(Config, path, overrides, base)
    if validate:
        cfg.validate()
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Nested {section: {key: value}} of plain JSON/YAML types (tuples become lists); see config_from_dict."""
    return engine.to_dict(cfg)


def config_from_dict(mapping: dict[str, Any], source: str = "stored config") -> Config:
    """Config from a config_to_dict mapping (missing keys keep defaults; unknown keys raise ValueError)."""
    return engine.from_dict(Config, mapping, source)
