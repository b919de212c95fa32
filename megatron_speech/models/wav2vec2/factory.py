"""Builds the wav2vec 2.0 models from a Wav2Vec2Config: the only place that reads the config object.

build_model is the one way every entry point, tool, benchmark and test builds a model (pre-training, or with a
fine-tuning head), in one call. transformer_config and build_pretraining_model are its two steps, kept public
only until the training drivers call build_model too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from .config import Wav2Vec2Config
from .encoder import Wav2Vec2Encoder
from .feature_extractor import ConvFeatureExtractor
from .heads import Wav2Vec2ForFinetuning, build_finetuning_model
from .layer_spec import block_spec, te_available
from .model import Wav2Vec2ForPretraining
from .quantizer import GumbelVectorQuantizer

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _transformer_config(
    cfg: Wav2Vec2Config,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    precision: str = "fp32",
    recompute: str = "none",
    use_te: bool | None = None,
    recompute_num_layers: int = 1,
    on_meta: bool = False,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for the context network (pre-LN, GELU MLP, biases, per-token loss).
    `use_te`: whether the block will be built with Transformer Engine (default: where TE imports and CUDA is
    present, as block_spec decides); pass the same value to build_pretraining_model. `recompute_num_layers`: layers
    per recomputed chunk with recompute="full". `on_meta`: the model is built on the meta device (no weights, no
    initialization)."""
    cfg.validate()
    if use_te is None:
        use_te = te_available()
    if precision not in _DTYPES:
        raise ValueError(f"train.precision={precision!r}: expected one of {sorted(_DTYPES)}")
    init = init_method_normal(cfg.init_std)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        layernorm_epsilon=cfg.layer_norm_eps,
        add_bias_linear=True,
        activation_func=torch.nn.functional.gelu,
        # fairseq initializes every linear layer N(0, 0.02), residual outputs included (no depth scaling).
        init_method=init,
        output_layer_init_method=init,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=tensor_model_parallel_size,
        sequence_parallel=sequence_parallel and tensor_model_parallel_size > 1,
        params_dtype=torch.float32,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        pipeline_dtype=_DTYPES[precision],
        attention_softmax_in_fp32=True,
        # the losses arrive already divided by the step's global count (training/step.py): with this, neither
        # megatron's schedule (1/num_microbatches) nor its DDP (1/dp) rescales them
        calculate_per_token_loss=True,
        use_cpu_initialization=on_meta or not on_gpu,
        perform_initialization=not on_meta,
        # megatron's fused bias-GELU is the tanh approximation; fairseq and transformers use erf GELU (parity with
        # transformers is what the converters promise), so it stays off.
        bias_activation_fusion=False,
        bias_dropout_fusion=on_gpu,  # the same function, fused (GPU only)
        masked_softmax_fusion=False,  # no softmax of megatron's: SDPA or TE attention
        # TE's linear layers add the weight gradient into megatron DDP's fp32 main_grad buffer in their GEMM
        # (no separate gradient tensor, no extra add). Needs every megatron linear to be TE's (the block's are)
        # and the model wrapped by megatron's DDP before a backward (the training drivers do).
        gradient_accumulation_fusion=use_te,
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=recompute_num_layers if recompute == "full" else None,
    )


def _build_pretraining_model(
    cfg: Wav2Vec2Config,
    tconfig: TransformerConfig,
    pg_collection: ProcessGroupCollection | None = None,
    recompute_conv: bool = False,
    use_te: bool | None = None,
    device: torch.device | str | None = None,
) -> Wav2Vec2ForPretraining:
    """The pre-training model on this rank (parallel_state must be initialized unless pg_collection given), on
    `device` (default: parallel.initialize.compute_device(), this rank's GPU or the CPU)."""
    if use_te is None:
        use_te = te_available()
    if tconfig.gradient_accumulation_fusion and not use_te:
        raise ValueError("the TransformerConfig fuses gradient accumulation into Transformer Engine's linear "
                         "layers, but the model is built without TE: pass the same use_te to transformer_config")
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    if device is None:
        from megatron_speech.parallel.initialize import compute_device

        device = compute_device()
    device = torch.device(device)
    encoder = Wav2Vec2Encoder(
        tconfig,
        block_spec(cfg.num_layers, use_te),
        pos_conv_kernel=cfg.pos_conv_kernel,
        pos_conv_groups=cfg.pos_conv_groups,
        dropout=cfg.dropout,
        pg_collection=pg_collection,
    )
    model = Wav2Vec2ForPretraining(
        tconfig,
        feature_extractor=ConvFeatureExtractor(
            cfg.conv_layers, bias=cfg.conv_bias, grad_mult=cfg.feature_grad_mult, recompute=recompute_conv,
            contiguous_weight_grad=device.type == "cpu",  # oneDNN's kernel choice (feature_extractor.py)
        ),
        encoder=encoder,
        quantizer=GumbelVectorQuantizer(
            cfg.conv_dim, cfg.num_codevector_groups, cfg.num_codevectors_per_group, cfg.codevector_dim
        ),
        conv_dim=cfg.conv_dim,
        final_dim=cfg.final_dim,
        feature_proj_dropout=cfg.feature_proj_dropout,
        feature_quantizer_dropout=cfg.feature_quantizer_dropout,
        logit_temperature=cfg.logit_temperature,
        diversity_loss_weight=cfg.diversity_loss_weight,
        feature_penalty_weight=cfg.feature_penalty_weight,
        pg_collection=pg_collection,
    )
    # megatron's linear layers already sit on the GPU (use_cpu_initialization is off there); the conv front-end,
    # quantizer and projections are torch modules built on the CPU: every parameter must be on one device before
    # megatron's DDP lays its gradient buffers over them.
    return model.to(device)


@dataclass(frozen=True)
class HeadSpec:
    """A fine-tuning head for build_model: kind "ctc" (num_outputs = vocabulary + blank) or "classification"
    (num_outputs = classes); layer_weighting and final_dropout as finetune.* of the same names."""

    kind: str
    num_outputs: int
    layer_weighting: bool = False
    final_dropout: float = 0.0


def build_model(
    model_cfg: Wav2Vec2Config,
    *,
    tp: int = 1,
    sequence_parallel: bool = False,
    precision: str = "fp32",
    recompute: str = "none",
    recompute_num_layers: int = 1,
    recompute_conv: bool = False,
    head: HeadSpec | None = None,
    use_te: bool | None = None,
    pg_collection: ProcessGroupCollection | None = None,
    device: torch.device | str | None = None,
) -> Wav2Vec2ForPretraining | Wav2Vec2ForFinetuning:
    """The model on this rank, in one call: the pre-training model, or with `head` the fine-tuning model around it.

    tp / sequence_parallel / precision / recompute / recompute_num_layers / recompute_conv: the run's
    parallel.tensor_model_parallel_size, parallel.sequence_parallel_enabled and train.* keys of the same names
    (defaults: a TP=1 fp32 model without recompute, as tools and evaluation want). pg_collection: the process
    groups (default: megatron's, parallel_state must be initialized; tools outside a launched job pass
    parallel.initialize.single_rank_groups()). device: default parallel.initialize.compute_device(); "meta"
    builds without weights (counting, planning). use_te: as transformer_config.
    """
    on_meta = device is not None and torch.device(device).type == "meta"
    tconfig = _transformer_config(model_cfg, tp, sequence_parallel, precision, recompute, use_te,
                                 recompute_num_layers=recompute_num_layers, on_meta=on_meta)
    # the conv front-end, quantizer and head are plain torch modules: the default device puts them on meta too
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = _build_pretraining_model(model_cfg, tconfig, pg_collection, recompute_conv, use_te, device)
        if head is None:
            return model
        return build_finetuning_model(model, head.kind, head.num_outputs, head.layer_weighting, head.final_dropout,
                                      model_cfg.init_std)


def gumbel_temperature(cfg: Wav2Vec2Config, step: int) -> float:
    """fairseq's schedule: max(max_t * decay^step, min_t), updated every step."""
    return max(cfg.gumbel_max_temperature * cfg.gumbel_temperature_decay**step, cfg.gumbel_min_temperature)


def count_parameters(cfg: Wav2Vec2Config) -> int:
    """Parameters of the pre-training model at TP=1, counted on the meta device (no weights allocated)."""
    from megatron_speech.parallel.initialize import single_rank_groups

    model = build_model(cfg, pg_collection=single_rank_groups(), device="meta")
    return sum(p.numel() for p in model.parameters())
