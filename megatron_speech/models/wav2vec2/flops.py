"""FLOP model of wav2vec 2.0 pre-training (docs/design.md §10): what MFU and the dry-run are computed from.

Counts matrix-multiply and convolution FLOPs (2 per multiply-add), as `torch.utils.flop_counter` does; norms,
activations, softmax and the loss's elementwise work are left out (well under 1% here). Forward, per utterance
of F frames (T = 320 (F - 1) + 400 samples, the crop rule):

- conv feature encoder: 2 C_in k C_out per output position of every block (the first block dominates the
  sample rate, the second the FLOPs);
- transformer matmuls: 2 (4 h^2 + 2 h f) per frame per layer (QKV, output projection, FC1, FC2);
- attention scores: 4 F^2 h per layer (Q K^T and the probabilities times V);
- other: feature projection, positional conv, `project_hid`, the cosine similarities against every target
  of the utterance ([F/tp, D] x [D, F]), and on the masked frames only, the quantizer's `weight_proj`, the
  codevector selection and `project_q`.

Training = 3 x forward (backward = 2 x: input and weight gradients), less the first conv layer's input
gradient (the waveform needs none). These are *model* FLOPs: activation recompute adds work that MFU does not
credit. Pure Python: the dry-run uses it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from megatron_speech.common.audio import SAMPLE_RATE

from .config import Wav2Vec2Config


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one micro-batch, by part."""

    conv: float
    """Conv feature encoder (all blocks)."""
    transformer: float
    """Transformer matmuls: QKV, output projection, FC1, FC2."""
    attention: float
    """Attention scores and their product with V."""
    other: float
    """Feature projection, positional conv, output projections, similarities, quantizer."""
    conv_first_layer: float
    """The first conv block alone (included in `conv`): its input gradient is never computed."""
    positional_conv: float
    """The positional conv alone (included in `other`): computed on the full sequence on every TP rank."""

    @property
    def total(self) -> float:
        return self.conv + self.transformer + self.attention + self.other

    @property
    def training(self) -> float:
        """Forward + backward model FLOPs: 3 x forward less the first conv layer's input gradient."""
        return 3 * self.total - self.conv_first_layer

    def scaled(self, factor: float) -> ForwardFlops:
        return ForwardFlops(**{f.name: getattr(self, f.name) * factor for f in fields(self)})


def expected_masked_frames(cfg: Wav2Vec2Config, num_frames: int) -> float:
    """Expected masked frames of one utterance of `num_frames` frames (fairseq's sampler, overlap allowed):
    n = mask_prob F / L spans (int(x + U[0, 1)) has mean x; at least mask_min_masks) of L frames, with starts
    drawn without replacement, cover F (1 - (1 - n / (F - L))^L) frames on average."""
    span = cfg.mask_length_frames
    if cfg.mask_prob <= 0 or num_frames <= 0:
        return 0.0
    num_spans = max(cfg.mask_min_masks, cfg.mask_prob * num_frames / span)
    starts = max(num_frames - span, 1)
    covered = 1.0 - max(0.0, 1.0 - num_spans / starts) ** span
    return min(float(num_frames), num_frames * covered)


def conv_output_lengths(cfg: Wav2Vec2Config, num_samples: int) -> list[int]:
    """Output length of every conv block for an input of num_samples samples."""
    return cfg.geometry.block_lengths(num_samples)


def forward_flops(cfg: Wav2Vec2Config, batch_size: int, num_frames: int,
                  num_masked: float | None = None) -> ForwardFlops:
    """Forward FLOPs of a micro-batch of `batch_size` utterances of `num_frames` frames each.

    num_masked: masked frames in the whole micro-batch (the quantizer and `project_q` run on those only);
    default: `expected_masked_frames` per utterance.
    """
    b, f = batch_size, num_frames
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    if num_masked is None:
        num_masked = b * expected_masked_frames(cfg, f)

    conv, first, c_in = 0.0, 0.0, 1
    for (c_out, kernel, _), length in zip(cfg.conv_layers, conv_output_lengths(cfg, cfg.num_samples(f)), strict=True):
        block = 2.0 * c_in * kernel * c_out * length * b
        first = first or block
        conv += block
        c_in = c_out

    transformer = cfg.num_layers * 2.0 * (4 * h * h + 2 * h * ffn) * f * b
    attention = cfg.num_layers * 4.0 * f * f * h * b

    # even kernel: padding k/2 on both sides gives F + 1 outputs, the last one dropped after the conv
    pos_frames = f + (1 if cfg.pos_conv_kernel % 2 == 0 else 0)
    positional = 2.0 * h * (h // cfg.pos_conv_groups) * cfg.pos_conv_kernel * pos_frames * b
    codes = cfg.num_codevector_groups * cfg.num_codevectors_per_group
    per_frame = 2.0 * (cfg.conv_dim * h + h * cfg.final_dim + f * cfg.final_dim)  # proj, project_hid, similarities
    per_masked = 2.0 * (cfg.conv_dim * codes  # weight_proj
                        + cfg.num_codevectors_per_group * cfg.codevector_dim  # one-hot x codebook, G groups
                        + cfg.codevector_dim * cfg.final_dim)  # project_q
    other = positional + per_frame * f * b + per_masked * num_masked
    return ForwardFlops(conv=conv, transformer=transformer, attention=attention, other=other,
                        conv_first_layer=first, positional_conv=positional)


def flops_per_audio_second(cfg: Wav2Vec2Config, crop_seconds: float = 15.0) -> ForwardFlops:
    """Forward FLOPs per second of audio at a crop of crop_seconds (docs/design.md §10 quotes XL at 15 s: training
    ~119 GFLOP per audio-second). `.training` gives the training FLOPs per audio-second."""
    num_frames = cfg.num_frames(round(crop_seconds * SAMPLE_RATE))
    if num_frames < 1:
        raise ValueError(f"a crop of {crop_seconds} s holds no frame")
    seconds = cfg.num_samples(num_frames) / SAMPLE_RATE
    return forward_flops(cfg, 1, num_frames).scaled(1.0 / seconds)


def per_rank_training_flops(flops: ForwardFlops, tensor_model_parallel_size: int) -> float:
    """Training FLOPs one TP rank executes for `flops` (one micro-batch): everything is split over the TP group
    (time-sharded conv, megatron's sharded matmuls, local heads) except the positional conv, which every TP
    rank runs on the whole sequence (encoder.py)."""
    tp = tensor_model_parallel_size
    replicated = 3 * flops.positional_conv
    return (flops.training - replicated) / tp + replicated
