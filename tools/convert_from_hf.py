"""A local Hugging Face transformers Wav2Vec2 directory -> our checkpoint (model weights + config).

    python tools/convert_from_hf.py --hf DIR --output CKPT [--tp N] [--config configs/NAME.yaml]

DIR holds config.json + model.safetensors (or pytorch_model.bin) of a Wav2Vec2ForPreTraining, Wav2Vec2Model or
Wav2Vec2ForCTC of the supported family (layer-norm extractor, pre-LN: XLSR-53, XLS-R, large-lv60); others are
refused. What the directory lacks starts as fairseq would start it, with a warning naming each weight: an
encoder-only model (Wav2Vec2Model, Wav2Vec2ForCTC) has no quantizer / project_q / project_hid (our model's fresh
initialization), and transformers saves no masked_spec_embed when mask_time_prob and mask_feature_prob are 0
(uniform_ in [0, 1)). A fine-tuned model's task head (Wav2Vec2ForCTC's lm_head) is dropped with a note.
The checkpoint records which weights are untrained; pre-training from it warns that its quantizer starts untrained.
The result starts a run with `train.init_checkpoint=CKPT` (pre-training) or `pretrained=CKPT` (fine-tuning), or
is read by `python -m megatron_speech.embed --checkpoint CKPT`; the training recipe (data, optim, train, parallel
sections) comes from --config (default: configs/xl.yaml).
Dist checkpoints reshard at load, so --tp only sets the layout this tool writes with (N spawned processes).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_hf(hf_dir: str):
    import transformers
    from safetensors.torch import load_file

    d = Path(hf_dir)
    if not (d / "config.json").exists():
        raise ValueError(f"{d} has no config.json: pass a transformers model directory")
    hf_config = transformers.Wav2Vec2Config.from_pretrained(d)
    if (d / "model.safetensors").exists():
        state = load_file(str(d / "model.safetensors"))  # no pickle
    elif (d / "pytorch_model.bin").exists():
        import torch

        state = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{d} has neither model.safetensors nor pytorch_model.bin")
    return hf_config, state


def convert(rank: int, world: int, hf_dir: str, output: str, config_path: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from megatron_speech.checkpoint.model_io import save_model_only
    from megatron_speech.config import load_config
    from megatron_speech.models.wav2vec2 import interop
    from megatron_speech.models.wav2vec2.factory import build_model
    from megatron_speech.parallel.initialize import destroy_parallel, initialize_parallel

    hf_config, state = _load_hf(hf_dir)
    model_cfg = interop.config_from_hf(hf_config)
    cfg = load_config(config_path, [])
    cfg.model = model_cfg
    cfg.parallel.tensor_model_parallel_size = world
    initialize_parallel(world, seed=cfg.train.seed)
    model = build_model(model_cfg, tp=world)
    state, dropped = interop.split_task_heads(state)
    canonical = interop.from_hf(state, model_cfg.num_attention_heads)
    ours = interop.canonical_state_dict(model)
    missing = sorted(set(ours) - set(canonical))
    lacking = [k for k in missing if not k.startswith(interop.HF_OPTIONAL)]
    if lacking:
        raise ValueError(f"{hf_dir} lacks encoder weights {[interop.hf_name(k) for k in lacking[:5]]}: a "
                         "truncated or foreign checkpoint")
    for k in missing:  # keep the model's fresh initialization (interop.HF_OPTIONAL says why that is fairseq's)
        canonical[k] = ours[k]
    if rank == 0:
        _report_absent(hf_dir, missing, dropped, model_cfg.layerdrop)
    interop.load_canonical(model, canonical)
    save_model_only(output, model, cfg, untrained=missing)
    destroy_parallel()


def _report_absent(hf_dir: str, missing: list[str], dropped: list[str], layerdrop: float) -> None:
    from megatron_speech.models.wav2vec2 import interop

    heads = [interop.hf_name(k) for k in missing if k != "mask_emb"]
    if "mask_emb" in missing:
        print(f"convert_from_hf: warning: {hf_dir} has no wav2vec2.masked_spec_embed (transformers saves it only "
              "when mask_time_prob or mask_feature_prob > 0): initialized uniform in [0, 1) as fairseq does; "
              "fine-tuning with finetune.mask_prob > 0 trains it from there", file=sys.stderr)
    if heads:
        print(f"convert_from_hf: warning: {hf_dir} is an encoder-only model without {', '.join(heads)}: "
              "initialized fresh; fine for fine-tuning and embed, but pre-training from it "
              "(train.init_checkpoint) starts with an untrained quantizer", file=sys.stderr)
    if layerdrop > 0:  # transformers' default is 0.1: most hub configs carry it without anyone having chosen it
        print(f"convert_from_hf: note: model.layerdrop={layerdrop} from {hf_dir}'s config (transformers' "
              "`layerdrop`): runs from this checkpoint skip layers while training unless model.layerdrop is set",
              file=sys.stderr)
    if dropped:
        print(f"convert_from_hf: note: dropped the task head {', '.join(dropped)} (fine-tuning builds its own)",
              file=sys.stderr)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--config", default=str(ROOT / "configs" / "xl.yaml"))
    args = parser.parse_args(argv)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        if args.tp == 1:
            convert(0, 1, args.hf, args.output, args.config, port)
        else:
            mp.start_processes(convert, args=(args.tp, args.hf, args.output, args.config, port), nprocs=args.tp,
                               start_method="spawn")
    except ValueError as e:
        print(f"convert_from_hf: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} (model weights + config; start runs with train.init_checkpoint={args.output})")
    return 0


if __name__ == "__main__":  # spawned ranks and dist_checkpointing's writers re-import __main__
    sys.exit(main(sys.argv[1:]))
