"""LayerDrop (Fan et al. 2019; fairseq's `encoder_layerdrop`, transformers' `layerdrop`): while training, each
transformer layer is skipped for a whole micro-batch with probability model.layerdrop; never in evaluation.

Who decides: the data path, like the masks. A micro-batch carries `skip_layers`, the 0-based indices of the layers
to skip, drawn from counter_rng(seed, step, micro_step, 0, LAYERDROP_STREAM) (common/rng.py). So an exact resume
draws what the uninterrupted run drew (nothing to save), every TP rank of a DP group agrees without communication
(they build the same micro-batches), and every *DP* rank skips the same layers at the same micro-step: the key's
dp_rank is 0 on purpose. With per-rank draws each rank would run a different number of layers and every step
would wait for the rank that skipped least (with 32 ranks, 24 layers and p = 0.1, nearly always one that skipped
none, so the run would pay for the full depth); with shared draws all ranks do the same work and the saving is
real. The price: fewer independent draws per global batch. With train.num_micro_batches=1 (the xl presets) a
skipped layer gets no gradient from any rank for that whole update (fairseq's per-GPU draws would give it the
other GPUs' gradients), about p of the updates, and Adam's moments alone move it then; the regularizer is the
one-GPU fairseq/transformers one applied to the global batch.

How a layer is skipped: layer_spec.LayerDropTransformerLayer returns its input, plus a zero that still reaches
each of its parameters (compat/megatron_core.zero_gradients_anchor says why megatron's DDP needs that).
"""

from __future__ import annotations

import numpy as np

from megatron_speech.common.rng import LAYERDROP_STREAM, counter_rng


def layer_skips(seed: int, step: int, micro_step: int, num_layers: int, layerdrop: float) -> tuple[int, ...]:
    """The 0-based layers a training micro-batch skips: layer i when its uniform draw u_i < layerdrop (transformers'
    test). A plain tuple: it stays on the host (the encoder branches on it) and passes the loader's workers as is."""
    if layerdrop <= 0.0:
        return ()
    draws = counter_rng(seed, step, micro_step, 0, LAYERDROP_STREAM).random(num_layers)
    return tuple(int(i) for i in np.flatnonzero(draws < layerdrop))
