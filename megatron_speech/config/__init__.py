"""Run configuration: typed dataclasses, YAML presets that only override them, `section.key=value` overrides.

    cfg = load_config("configs/xl.yaml", ["train.max_steps=1000", "data.prefix=/data/en"])
    cfg.validate(world_size=32)          # before any process group forms

engine.py is the generic typed-dataclass loader (YAML, overrides, dicts, --help, the command line); schema.py the
sections, each checking its own fields; rules.py the rules across sections; run.py the root `Config` and the
loaders bound to it. Import from here.
"""

from megatron_speech.config.engine import apply_override, field_docs, field_types, format_help, parse_cli, type_name
from megatron_speech.config.run import (
    Config,
    all_keys,
    config_from_dict,
    config_to_dict,
    load_config,
    sections,
)
from megatron_speech.config.schema import (
    DataConfig,
    FinetuneConfig,
    FinetuneTask,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    Precision,
    Recompute,
    SaveErrorPolicy,
    TrainConfig,
    WandbMode,
)

__all__ = [
    "Config", "DataConfig", "FinetuneConfig", "FinetuneTask", "LoggingConfig", "OptimConfig", "ParallelConfig",
    "Precision", "Recompute", "SaveErrorPolicy", "TrainConfig", "WandbMode", "all_keys", "apply_override",
    "config_from_dict", "config_to_dict", "field_docs", "field_types", "format_help", "load_config", "parse_cli",
    "sections", "type_name",
]
