"""megatron-speech: wav2vec 2.0 pre-training and fine-tuning on megatron-core."""

__version__ = "0.1.0"
