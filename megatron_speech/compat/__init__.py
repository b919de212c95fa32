"""Every workaround for megatron-core's internals, in one place. All target megatron-core 0.16.1
(megatron_core.MEGATRON_CORE_VERSION): upgrading megatron-core means re-checking this list, and nothing else.

compat/cpu.py: megatron-core's CUDA assumptions made to hold on a CPU-only machine (a no-op with CUDA)
  - apply_cpu_compat: a torch function mode rewrites device="cuda"/current_device() allocations, x.cuda() and
    param.type() ("torch.cuda.FloatTensor" branches of the optimizer and clip-grad) to CPU;
    torch.cuda.current_device / synchronize patched (Timers and dist_checkpointing call them unconditionally);
  - CpuRNGStatesTracker replaces tensor_parallel.random.CudaRNGStatesTracker, and its private
    _get_cuda_rng_state / _set_cuda_rng_state work on the CPU generator (TP RNG streams, activation recompute).

compat/megatron_core.py
  - patch_torch_adam_state_restore: DistributedOptimizer._set_main_param_and_optimizer_states (private) raises
    KeyError('step') loading a fully_reshardable state into torch's Adam (called by training/optim.py);
  - unshare_adam_steps: after a load every parameter shares one "step" tensor, which torch Adam advances once per
    parameter;
  - materialize_optimizer_state: a fresh torch Adam has no state to load into (megatron's private
    _init_optimizer_states_with_dummy_values);
  - zero_bucket_padding: bucket gaps are torch.empty garbage in a saved dp_reshardable state (walks 0.16.1's
    param_state[gbuf][dtype][bucket] layout);
  - load_optimizer_state: dp_reshardable's loader overwrites the restored step with the live one, copies into
    leaves outside no_grad, and reports a bucket-layout mismatch only as an AssertionError ("unpadded
    elements"), turned into BucketLayoutError;
  - disarm_ddp: a replaced DDP wrapper's gradient hooks have no handles; emptying its param_to_bucket_group
    (and disable_forward_pre_hook under overlap_param_gather) makes them no-ops (fine-tuning's unfreeze);
  - finalize_grads: finalize_model_grads (0.16.1's finalize_model_grads_func signature) without its division by
    the token count, plus the TP sum of local-slice gradients with SP off (training/parallelize.py binds it);
  - zero_gradients_anchor: DDP's overlapped reduce waits for a gradient hook of every parameter of a bucket; a
    layer LayerDrop skips adds a zero that reaches its parameters, so their hooks fire (layer_spec.py);
  - attention_mask_type / mask_type_from_call: BERT specs fix the `padding` mask type at build time and TE
    asserts on padding without a mask: the core attention takes its type from each call;
  - TORCH_DIST_METADATA_GLOBALS: the megatron classes torch_dist pickles into `.metadata`, allowed by
    checkpoint/integrity.py's restricted unpickler.

Relied on elsewhere, not workarounds (megatron-core API used as documented, listed for an upgrade's check):
  - models/wav2vec2/layer_spec.py: SDPAttention mirrors DotProductAttention's constructor and forward; the local
    spec reuses bert_layer_local_spec's sharded_state_dict_keys_map (TE checkpoint key names); LayerNorm takes
    ModuleSpec's (config, hidden_size, eps) and sets `sequence_parallel` (WrappedTorchNorm refuses SP);
  - training/parallelize.py: local-slice parameters marked `sequence_parallel` so finalize_model_grads sums them
    over TP under SP; optimizer.scale_loss set as config.grad_scale_func (training/optim.py, as Megatron-LM);
  - parallel/initialize.py: model_parallel_cuda_manual_seed seeds only CUDA, so the CPU generator is seeded too;
  - checkpoint/checkpointing.py: the optimizer's sharded_state_dict metadata key distrib_optim_sharding_type and
    megatron's fully parallel save/load strategy wrappers.
"""
