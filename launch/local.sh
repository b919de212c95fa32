#!/usr/bin/env bash
# Pre-training on one machine: torchrun with NPROC processes (one per GPU, or CPU processes with gloo).
#
#   launch/local.sh NPROC CONFIG [section.key=value ...]
#   launch/local.sh 2 configs/tiny.yaml data.prefix=demo/shards/pretrain train.max_steps=20     # CPU, 2 processes
#   launch/local.sh 8 configs/xl.yaml data.prefix=/data/en                                  # one 8-GPU machine
#
# Runs the dry-run first (layout, memory and FLOPs for NPROC processes; DRY_RUN=0 skips it), then
# `torchrun --standalone` (a free port on this machine). Environment: PYTHON (default: this checkout's .venv if
# there is one, else python3), OMP_NUM_THREADS (default 1: NPROC processes share the cores).
# Stopping: SIGTERM to torchrun (`kill <pid>`) is forwarded to every rank, which finishes its step, saves and
# stops; run the same command again to resume from <train.save_dir>/latest. (Ctrl-C interrupts without saving.)
# Exit status: 0 when the run is done; torchrun reports a worker's non-zero exit (75 stopped after saving,
# 3 diverged) as 1, which is one reason the Slurm scripts use srun without torchrun (launch/common.sh).
set -euo pipefail

if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    [[ $# -ge 1 && ($1 == -h || $1 == --help) ]] && exit 0
    exit 2
fi
nproc=$1
config=$2
shift 2
if ! [[ $nproc =~ ^[1-9][0-9]*$ ]]; then
    echo "launch/local.sh: NPROC must be a positive integer, got '$nproc'" >&2
    exit 2
fi
[[ -f $config ]] || { echo "launch/local.sh: no config file '$config'" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torchrun sets these for every worker; stale values from the calling shell would confuse nothing but a reader.
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT

if [[ ${DRY_RUN:-1} == 1 ]]; then
    "$PYTHON" -m megatron_speech.dry_run --config "$config" --world-size "$nproc" "$@"
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
    -m megatron_speech.pretrain --config "$config" "$@"
