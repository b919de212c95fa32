"""The wav2vec 2.0 architecture and pre-training objective, as one typed dataclass.

Field names follow fairseq's wav2vec2 where one exists; units are in the name or the docstring.
Only the "stable layer norm" family is supported (layer-norm conv extractor, pre-LN transformer: XLSR-53,
XLS-R, large-lv60): megatron-core's transformer layer is pre-LN only (docs/design.md §3, Scope).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_speech.common.audio import ConvGeometry

# fairseq's conv feature encoder: (channels, kernel, stride) per block; total stride 320 samples, receptive
# field 400 samples (25 ms at 16 kHz), one frame every 20 ms.
DEFAULT_CONV_LAYERS: list[tuple[int, int, int]] = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2

FRAME_MS = 20


@dataclass
class Wav2Vec2Config:
    """Architecture and objective of a wav2vec 2.0 model. Defaults are the XL (317M, XLSR-53-class) model."""

    conv_layers: list[tuple[int, int, int]] = field(default_factory=lambda: list(DEFAULT_CONV_LAYERS))
    """Conv feature encoder blocks as (channels, kernel samples/frames, stride)."""
    conv_bias: bool = True
    """Bias in the conv feature encoder (XLSR: True)."""
    extractor_mode: str = "layer_norm"
    """Conv block normalization. Only "layer_norm" is supported (group norm cannot be time-sharded exactly)."""
    hidden_size: int = 1024
    """Transformer width (fairseq encoder_embed_dim)."""
    num_layers: int = 24
    """Transformer layers."""
    num_attention_heads: int = 16
    """Attention heads."""
    ffn_hidden_size: int = 4096
    """Transformer feed-forward width."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm in the model."""
    dropout: float = 0.1
    """Dropout on the transformer's residual branches and after the positional embedding."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    layerdrop: float = 0.0
    """Probability that a training micro-batch skips a transformer layer (fairseq encoder_layerdrop, transformers
    layerdrop; fairseq's large-model fine-tuning recipes use 0.1). Never in evaluation; not part of the architecture
    (fine-tuning may set it)."""
    activation_dropout: float = 0.0
    """Dropout after the FFN activation (megatron-core's MLP has none: must stay 0)."""
    feature_proj_dropout: float = 0.1
    """Dropout after the feature projection (fairseq dropout_input)."""
    feature_quantizer_dropout: float = 0.1
    """Dropout on the features fed to the quantizer (fairseq dropout_features)."""
    feature_grad_mult: float = 1.0
    """Scale of the gradient flowing into the conv feature encoder (fairseq; 0.1 for base, 1.0 for XL)."""
    pos_conv_kernel: int = 128
    """Kernel width of the convolutional positional embedding, in frames."""
    pos_conv_groups: int = 16
    """Groups of the convolutional positional embedding."""
    final_dim: int = 768
    """Dimension of the contrastive space (project_hid / project_q outputs)."""
    num_codevector_groups: int = 2
    """Quantizer groups G."""
    num_codevectors_per_group: int = 320
    """Quantizer entries per group V."""
    codevector_dim: int = 768
    """Concatenated codevector dimension (codevector_dim / G per group)."""
    mask_prob: float = 0.065
    """Probability that a frame starts a masked span (fairseq large: 0.65; see configs/xl.yaml)."""
    mask_length: int = 3
    """Masked span length in frames (20 ms each). See mask_length_ms."""
    mask_length_ms: float | None = None
    """Masked span length in ms; when set it overrides mask_length as round(ms / 20) frames (65 ms -> 3)."""
    mask_min_masks: int = 2
    """Minimum number of masked spans per utterance."""
    mask_channel_prob: float = 0.0
    """Probability that a feature channel starts a masked channel span (SpecAugment along channels)."""
    mask_channel_length: int = 10
    """Masked channel span length, in channels."""
    num_negatives: int = 100
    """Distractors K per masked frame, drawn from the same utterance's masked frames."""
    logit_temperature: float = 0.1
    """Temperature of the cosine-similarity logits."""
    gumbel_max_temperature: float = 2.0
    """Gumbel softmax temperature at step 0."""
    gumbel_min_temperature: float = 0.1
    """Floor of the Gumbel temperature (base models: 0.5)."""
    gumbel_temperature_decay: float = 0.999995
    """Per-step multiplicative decay of the Gumbel temperature."""
    diversity_loss_weight: float = 0.1
    """Weight of the codebook diversity loss."""
    feature_penalty_weight: float = 0.0
    """Weight of the L2 penalty on conv features (XL: 0, base: 10)."""
    init_std: float = 0.02
    """Std of the normal init of linear layers."""

    @property
    def mask_length_frames(self) -> int:
        if self.mask_length_ms is not None:
            return max(1, round(self.mask_length_ms / FRAME_MS))
        return self.mask_length

    @property
    def conv_dim(self) -> int:
        return self.conv_layers[-1][0]

    @property
    def geometry(self) -> ConvGeometry:
        """Sample <-> frame arithmetic of the conv feature encoder: what the data path, the FLOP model and the
        encoder are given (common/audio.py)."""
        return ConvGeometry.of_layers(self.conv_layers)

    @property
    def total_stride(self) -> int:
        """Samples between frames (320 for the default stack)."""
        return self.geometry.stride

    @property
    def receptive_field(self) -> int:
        """Samples seen by one output frame of the conv encoder (400 for the default stack)."""
        return self.geometry.receptive_field

    def num_frames(self, num_samples: int) -> int:
        """Frames the conv encoder produces from num_samples samples."""
        return self.geometry.num_frames(num_samples)

    def num_samples(self, num_frames: int) -> int:
        """Smallest sample count that yields exactly num_frames frames: stride * (F - 1) + receptive field."""
        return self.geometry.num_samples(num_frames)

    def validate(self) -> None:
        """Raise ValueError naming the field for anything outside the supported family."""
        if self.extractor_mode != "layer_norm":
            raise ValueError(
                f"model.extractor_mode={self.extractor_mode!r}: only 'layer_norm' (XLSR / large-lv60 family) is "
                "supported; group-norm extractors cannot be time-sharded exactly (docs/design.md §3 Scope)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.codevector_dim % self.num_codevector_groups:
            raise ValueError(
                f"model.codevector_dim={self.codevector_dim} must be divisible by "
                f"model.num_codevector_groups={self.num_codevector_groups}"
            )
        if self.hidden_size % self.pos_conv_groups:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by "
                f"model.pos_conv_groups={self.pos_conv_groups}"
            )
        if self.activation_dropout != 0.0:
            raise ValueError("model.activation_dropout must be 0: megatron-core's MLP has no inner dropout")
        for name in ("mask_prob", "mask_channel_prob", "dropout", "attention_dropout", "feature_proj_dropout",
                     "feature_quantizer_dropout", "layerdrop"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"model.{name}={v} must be in [0, 1)")
        if self.num_negatives < 1:
            raise ValueError(f"model.num_negatives={self.num_negatives} must be >= 1")
        if self.mask_length_frames < 1:
            raise ValueError(f"model.mask_length={self.mask_length} must be >= 1 frame")
