"""The fine-tuning run's config: the pretrained checkpoint's model section (or finetune.scratch_config's) and
normalization under the YAML file and the overrides; bare `key=value` overrides of the finetune section. Kept apart
from the config package because it reads a checkpoint (config/ imports nothing above it)."""

from __future__ import annotations

from pathlib import Path

from megatron_speech.checkpoint.model_io import checkpoint_config
from megatron_speech.config import Config, FinetuneConfig, load_config

ROOT = Path(__file__).resolve().parents[2]

# Model fields that define the weights: they must be the pretrained checkpoint's. The others (dropouts, the
# pre-training objective's settings) may be overridden for fine-tuning.
ARCHITECTURE = ("conv_layers", "conv_bias", "extractor_mode", "hidden_size", "num_layers", "num_attention_heads",
                "ffn_hidden_size", "layer_norm_eps", "pos_conv_kernel", "pos_conv_groups", "final_dim",
                "num_codevector_groups", "num_codevectors_per_group", "codevector_dim")


def expand_bare_keys(overrides: list[str]) -> list[str]:
    """`pretrained=CKPT` -> `finetune.pretrained=CKPT` (any key of the finetune section may be given bare)."""
    fields = set(FinetuneConfig.__dataclass_fields__)
    return [f"finetune.{o}" if o.split("=", 1)[0].strip() in fields else o for o in overrides]


def resolve_config_file(path: str) -> Path:
    """A config file path as given, else relative to the repository root."""
    for candidate in (Path(path), ROOT / path):
        if candidate.is_file():
            return candidate
    raise ValueError(f"finetune.scratch_config={path!r}: no such file (tried {Path(path).resolve()} and "
                     f"{ROOT / path})")


def load_finetune_config(path: str | None, overrides: list[str]) -> Config:
    """The run's config: the pretrained checkpoint's model section (or scratch_config's) and normalization, then
    the YAML file and the overrides on top. Architecture changes against the checkpoint are refused."""
    overrides = expand_bare_keys(overrides)
    probe = load_config(path, overrides, validate=False)
    ft = probe.finetune
    if ft.task == "none":
        raise ValueError("finetune.task is 'none': set it (phoneme, asr, speaker or emotion), e.g. with "
                         "--config configs/finetune/phoneme.yaml")
    if ft.pretrained_path:
        source, what = checkpoint_config(ft.pretrained_path), f"the pretrained checkpoint {ft.pretrained_path}"
    else:
        scratch = resolve_config_file(ft.scratch_config)
        source, what = load_config(str(scratch), validate=False), f"finetune.scratch_config={scratch}"
    base = Config()
    base.model = source.model
    base.data.normalize, base.data.normalize_eps = source.data.normalize, source.data.normalize_eps
    cfg = load_config(path, overrides, base=base)
    changed = [k for k in ARCHITECTURE if getattr(cfg.model, k) != getattr(source.model, k)]
    if changed:
        raise ValueError(f"model.{changed[0]}={getattr(cfg.model, changed[0])!r} differs from {what} "
                         f"({getattr(source.model, changed[0])!r}): the architecture comes from there; remove "
                         f"model.{', model.'.join(changed)} from the fine-tuning config")
    return cfg
