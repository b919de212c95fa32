"""What one GPU holds for a wav2vec 2.0 model: parameters per TP rank by part, weights + gradients + optimizer
state as megatron-core's distributed optimizer keeps them, checkpoint bytes per rank, and activation bytes saved
for backward at a batch shape. Torch-free arithmetic over the model config, beside the FLOP model (flops.py); the
dry run (megatron_speech/dry_run.py) and docs/performance.md read it. An estimate: the CUDA context, NCCL buffers
and allocator fragmentation come on top.
"""

from __future__ import annotations

from megatron_speech.models.wav2vec2.config import Wav2Vec2Config
from megatron_speech.models.wav2vec2.flops import conv_output_lengths, expected_masked_frames

# ------------------------------------------------------------------------------------------------------------
# Parameters


def parameter_counts(m: Wav2Vec2Config, tensor_model_parallel_size: int = 1) -> dict[str, int]:
    """Parameters one TP rank holds, by part (their sum at TP=1 is the model's count).

    megatron shards the QKV / FC1 weights and biases (column-parallel) and the output-projection / FC2 weights
    (row-parallel) over TP; the row-parallel biases, the LayerNorms and everything outside the transformer
    layers (conv encoder, positional conv, quantizer, projections) are whole on every TP rank.
    """
    tp = tensor_model_parallel_size
    h, f, c = m.hidden_size, m.ffn_hidden_size, m.conv_dim
    conv, c_in = 0, 1
    for c_out, kernel, _ in m.conv_layers:
        conv += c_in * kernel * c_out + (c_out if m.conv_bias else 0) + 2 * c_out  # conv + LayerNorm
        c_in = c_out
    sharded = (3 * h * h + 3 * h) + h * h + (h * f + f) + f * h  # QKV (+bias), proj, FC1 (+bias), FC2
    replicated = 2 * h + h + 2 * h + h  # 2 LayerNorms, proj and FC2 biases
    codes = m.num_codevector_groups * m.num_codevectors_per_group
    return {
        "conv encoder": conv,
        "feature projection": 2 * c + c * h + h + h,  # LayerNorm, projection, mask embedding
        "positional conv": h * (h // m.pos_conv_groups) * m.pos_conv_kernel + m.pos_conv_kernel + h,
        "transformer": m.num_layers * (sharded // tp + replicated) + 2 * h,  # + final LayerNorm
        "quantizer + heads": (m.num_codevectors_per_group * m.codevector_dim + c * codes + codes
                              + m.codevector_dim * m.final_dim + m.final_dim + h * m.final_dim + m.final_dim),
    }


# ------------------------------------------------------------------------------------------------------------
# Memory


def _bytes_per_element(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_state_bytes(num_params: int, precision: str, dp: int, distributed_optimizer: bool,
                      ema: bool) -> dict[str, float]:
    """Bytes per GPU of the model's state. megatron-core DDP keeps an fp32 gradient buffer
    (grad_reduce_in_fp32); under fp16/bf16 the model weights are 16-bit and the optimizer holds fp32 master
    weights; Adam adds two fp32 moments. The distributed optimizer shards master weights and moments over the
    DP ranks (fp32 runs use the weights themselves as masters). EMA: an fp32 copy on every rank."""
    half = precision != "fp32"
    optimizer = (12 if half else 8) * num_params
    return {
        "weights": (2 if half else 4) * num_params,
        "gradients": 4 * num_params,
        "optimizer": optimizer / dp if distributed_optimizer else optimizer,
        "ema": 4 * num_params if ema else 0,
    }


def checkpoint_bytes(num_params: int, largest_tensor: int, precision: str, dp: int, distributed_optimizer: bool,
                     ema: bool, total_params: int | None = None) -> dict[str, float]:
    """Bytes of one checkpoint save, derived from the parameter count of one TP rank (not measured).

    Stored: the model weights in the training dtype, the EMA in fp32, and the optimizer state in fp32 (megatron
    saves the master weights, or the fp32 weights themselves, and Adam's two moments: 12 bytes a parameter;
    bucket padding, RNG states and the common state are a few KB). With megatron's fully parallel save over the
    DP group (checkpoint/checkpointing.py), the DP replicas of the weights and EMA split the writing by whole
    tensors, and the distributed optimizer's state is written `dp_reshardable`: each DP rank its own 1/dp shard.
    A rank may write up to one largest tensor more than the even share. Returns the totals per TP rank
    ("weights", "ema", "optimizer", "total"), "per_rank" and "per_rank_max" (the bound), "before": what
    DP rank 0 wrote alone with `fully_reshardable` and no parallel save (the same total, after an all-gather of
    the whole optimizer state onto every rank), and "save_total": one save over all TP ranks (total_params:
    the model's count; TP replicas are written once)."""
    half = precision != "fp32"
    weight_bytes = 2 if half else 4
    out = {"weights": weight_bytes * num_params, "ema": 4 * num_params if ema else 0,
           "optimizer": 12 * num_params}
    out["total"] = out["weights"] + out["ema"] + out["optimizer"]
    out["per_rank"] = out["total"] / dp
    out["per_rank_max"] = out["per_rank"] + largest_tensor * (4 if ema else weight_bytes)
    if not distributed_optimizer:  # the plain optimizer's state is replicated over DP: split like the weights
        out["per_rank_max"] += 4 * largest_tensor
    out["before"] = out["total"]
    out["gathered_per_rank"] = out["optimizer"] if distributed_optimizer else 0
    out["save_total"] = out["total"] * (total_params or num_params) / num_params
    return out


def largest_tensor(m: Wav2Vec2Config, tensor_model_parallel_size: int = 1) -> int:
    """Elements of the model's largest single tensor on one TP rank (the granularity of a split save)."""
    h, f, tp = m.hidden_size, m.ffn_hidden_size, tensor_model_parallel_size
    conv = max(c_in * kernel * c_out for c_in, (c_out, kernel, _) in
               zip([1] + [c for c, _, _ in m.conv_layers], m.conv_layers))
    return max(3 * h * h // tp, h * f // tp, h * (h // m.pos_conv_groups) * m.pos_conv_kernel, conv)


def activation_bytes(m: Wav2Vec2Config, batch_size: int, num_frames: int, *, precision: str = "fp32",
                     tensor_model_parallel_size: int = 1, sequence_parallel: bool = False,
                     recompute_transformer: str = "none", recompute_conv: bool = False,
                     num_masked: float | None = None, dropout_mask_bytes: int = 1) -> dict[str, float]:
    """Bytes one rank keeps for backward during one micro-batch's forward, by part.

    Counts the tensors the model's ops save (not parameters), from the model code's own layout: LayerNorms
    save an fp32 copy of their input, linears and convs their input, GELU its input, SDPA its q, k, v and
    output (flash / memory-efficient kernels: no [s, s] matrix), dropout its mask (`dropout_mask_bytes` per
    element: 1 on GPU, where dropout keeps a bool mask; CPU kernels keep it in the activation dtype; attention
    dropout inside the fused kernels keeps none). With tp > 1 the conv
    encoder, projections and the quantizer see F/tp frames (time sharding); the transformer block runs on the
    gathered sequence with its LayerNorm and QKV/FC1 inputs replicated unless sequence parallelism splits
    them too (Korthikanti et al.); the positional conv always sees the whole sequence.
    """
    e = _bytes_per_element(precision)
    half = precision != "fp32"
    tp = tensor_model_parallel_size
    sp = sequence_parallel and tp > 1
    b, f = batch_size, num_frames
    local = b * f / tp  # frames on this rank
    h, ffn, c = m.hidden_size, m.ffn_hidden_size, m.conv_dim
    codes = m.num_codevector_groups * m.num_codevectors_per_group
    if num_masked is None:
        num_masked = b * expected_masked_frames(m, f)
    masked_local = num_masked / tp
    drop = dropout_mask_bytes if m.dropout > 0 else 0

    # Conv encoder: per block, the LayerNorm's fp32 input and GELU's input; the block's output is the next
    # conv's input. The last block's output is read twice in fp32 (feature penalty, feature LayerNorm).
    lengths = conv_output_lengths(m, m.num_samples(f))
    elements = [b * ch * t / tp for (ch, _, _), t in zip(m.conv_layers, lengths, strict=True)]
    waveform = e * b * m.num_samples(f) / tp
    last = (8 if half else 4) * elements[-1]
    if recompute_conv:
        conv = waveform + last
    else:
        conv = waveform + sum((4 + e) * n for n in elements) + sum(e * n for n in elements[:-1]) + last

    # Feature projection input, dropouts, quantizer input on masked frames.
    front = local * (e * c + dropout_mask_bytes * ((c if m.feature_quantizer_dropout > 0 else 0)
                                                   + (h if m.feature_proj_dropout > 0 else 0)))

    # Transformer block: tokens per rank in the block, and the replicated share without SP.
    block_tokens = local if sp else b * f
    if recompute_transformer == "full":
        transformer = m.num_layers * e * h * block_tokens
    else:
        replicated = (4 + e + 4 + e) * h + 2 * drop * h  # two LayerNorm inputs, QKV and FC1 inputs, residual dropouts
        sharded = (3 * e * h + 2 * e * h + 2 * e * ffn) / tp  # q k v, SDPA output + its reshaped copy, GELU in/out
        transformer = m.num_layers * (replicated * block_tokens + sharded * b * f)
    transformer += 4 * h * block_tokens  # final LayerNorm
    # Positional conv: input and GELU input over the whole sequence on every rank, the weight-normed kernel,
    # then the dropout mask.
    kernel = e * h * (h // m.pos_conv_groups) * m.pos_conv_kernel
    positional = 2 * e * h * b * (f + 1) + kernel + drop * h * block_tokens

    # Heads: project_hid input, normalized predictions (local) and targets (all frames), logits and softmax of
    # the masked frames, quantizer activations (weight_proj input, fp32 logits / probabilities, one-hot selection,
    # codevectors).
    heads = (local * (e * h + 8 * m.final_dim) + 8 * b * f * m.final_dim
             + masked_local * (12 * (m.num_negatives + 1) + e * c + 12 * codes + e * codes + e * m.codevector_dim))
    return {"conv encoder": conv, "transformer": transformer, "positional conv": positional,
            "projections, quantizer, loss": front + heads}
