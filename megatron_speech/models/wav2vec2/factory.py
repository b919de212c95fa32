"""Builds the wav2vec 2.0 modules from a Wav2Vec2Config: the only place that reads the config object."""

from __future__ import annotations

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from .config import Wav2Vec2Config
from .encoder import Wav2Vec2Encoder
from .feature_extractor import ConvFeatureExtractor
from .layer_spec import block_spec, te_available
from .model import Wav2Vec2ForPretraining
from .quantizer import GumbelVectorQuantizer

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(
    cfg: Wav2Vec2Config,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    precision: str = "fp32",
    recompute: str = "none",
    use_te: bool | None = None,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for the context network (pre-LN, GELU MLP, biases, per-token loss).
    `use_te`: whether the block will be built with Transformer Engine (default: where TE imports and CUDA is
    present, as block_spec decides); pass the same value to build_pretraining_model."""
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
        use_cpu_initialization=not on_gpu,
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
        recompute_num_layers=1 if recompute == "full" else None,
    )


def build_pretraining_model(
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


def gumbel_temperature(cfg: Wav2Vec2Config, step: int) -> float:
    """fairseq's schedule: max(max_t * decay^step, min_t), updated every step."""
    return max(cfg.gumbel_max_temperature * cfg.gumbel_temperature_decay**step, cfg.gumbel_min_temperature)


def count_parameters(cfg: Wav2Vec2Config) -> int:
    """Parameters of the pre-training model at TP=1, counted on the meta device (no weights allocated)."""
    tconfig = transformer_config(cfg)
    tconfig.use_cpu_initialization = True
    tconfig.perform_initialization = False
    with torch.device("meta"):
        model = build_pretraining_model(cfg, tconfig, pg_collection=_single_rank_groups(), device="meta")
    return sum(p.numel() for p in model.parameters())


def _single_rank_groups() -> ProcessGroupCollection:
    """Process groups for building a model outside a launched job (counting, conversion, tests): a
    one-process world unless one is already initialized."""
    from megatron.core import parallel_state

    from megatron_speech.parallel.initialize import initialize_parallel

    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel(1)
    return ProcessGroupCollection.use_mpu_process_groups()
