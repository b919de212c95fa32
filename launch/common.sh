# shellcheck shell=bash
# Shared by launch/*.sbatch (sourced from the batch script; not a job script itself).
#
# One Slurm task per GPU, no torchrun (the launch decision, and why):
#   - Slurm delivers the warning signal (--signal=USR1@300) to every task of the step, so each training process
#     gets it directly; torchrun in between would die on USR1 unless shielded, turns SIGTERM into SIGKILL after
#     30 s (a save in progress would be lost) and reports any worker's exit code as 1, erasing the code that
#     says "requeue me" (75) or "diverged, don't" (3). srun returns the tasks' exit code unchanged.
#   - no second rendezvous to configure: the driver maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to
#     RANK / WORLD_SIZE / LOCAL_RANK itself, MASTER_ADDR is the first node of the allocation (exported below)
#     and MASTER_PORT derives from the job id unless set (megatron_speech/parallel/initialize.py).
#   - `srun --wait=60` ends the whole step 60 s after the first task exits, so one crashed rank does not leave
#     31 ranks waiting in a collective until the wall-time runs out; not --kill-on-bad-exit, which would kill
#     the other ranks the moment the first one exits 75 on purpose (they all save, then exit within a second
#     or two of each other) and turn the step's exit code into 143.
#   Each task sees all 8 GPUs of its node and picks GPU LOCAL_RANK: do not add --gpus-per-task or
#   --gpu-bind=single:1 (CUDA_VISIBLE_DEVICES would hold one GPU and LOCAL_RANK 3 would not exist; NCCL also
#   finds NVLink peers only among GPUs it can see).
#
# Signals reach every process of the step (slurmstepd signals the step's whole process tree): the DataLoader
# workers, megatron's checkpoint-writer Manager (spawned at the first save), wandb's service. They are shielded in
# Python rather than by `--signal=B:USR1` (batch shell only) plus a stop file: preemption and scancel send SIGTERM
# to every process of the step whatever --signal says, so the helpers must survive a signal anyway, and once they
# do, USR1 straight to the ranks needs no file on shared storage polled every step. So helpers start with
# USR1/TERM blocked (the mask is inherited across fork and exec) and DataLoader workers ignore them; only the
# training processes act (megatron_speech/training/signals.py). wandb's service unblocks TERM itself (a Go
# program) and dies of preemption: the training process then goes on without it (metrics.jsonl has every step).
# A USR1 sent to the batch shell alone (`scancel --batch --signal=USR1`) is forwarded to the step by ms_run_step.
#
# Requeue protocol (the driver's exit codes, megatron_speech/training/signals.py):
#   0  done (train.max_steps reached, or early-stopped)           -> the job ends COMPLETED
#   75 stopped by USR1/TERM after saving a checkpoint (preempted) -> `scontrol requeue`, unless the batch shell
#      itself was sent TERM (scancel, Slurm's own preemption/requeue: Slurm decides then) or the job was already
#      restarted MAX_REQUEUES times (SLURM_RESTART_COUNT counts every restart, Slurm's and ours)
#   3  diverged (NaN/inf losses, fp16 loss scale at its floor)    -> no requeue: a restart would diverge again
#   4  a peer rank died or hung (a collective failed or timed out) -> requeue while SLURM_RESTART_COUNT <
#      MAX_FAILURE_REQUEUES [2]: a flaky node is worth a restart from the last checkpoint, a bug that kills a
#      rank every time is not worth twenty
#   5  a checkpoint save failed (disk full, unwritable)           -> no requeue: free space, then resubmit
#   128+N  a rank was killed by signal N, before any Python handler could run -> the same bounded requeue as 4
#      (unless the batch shell got TERM, as for 75). On NCCL this is how a dead or hung peer ends: with
#      TORCH_NCCL_ASYNC_ERROR_HANDLING=1 the watchdog aborts the process when a collective fails or passes
#      train.collective_timeout_seconds (SIGABRT: 134); srun --wait=60 then SIGKILLs the ranks still running
#      (137). 137 is also the kernel's OOM killer, 143 a SIGTERM that arrived before the handlers were installed
#      (start-up), 139 a segfault. A node's fault is worth a restart from the last checkpoint; a bug that aborts
#      every time stops after MAX_FAILURE_REQUEUES restarts, with the rank's stderr in the log.
#   anything else: a crash (a Python exception: 1)                 -> no self-requeue (--requeue still lets Slurm
#      requeue the job on a node failure)
# The requeued job resumes from <train.save_dir>/latest by itself.

ms_log() { echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-?}: $*"; }

# --- environment for A100 nodes (8 x A100 with NVLink/NVSwitch, InfiniBand between nodes). Every value can be
# overridden by exporting it before `sbatch` (sbatch passes the submitting environment to the job).
ms_setup_env() {
    # torch intra-op threads per rank: the CPU work is done by the DataLoader workers (one thread each);
    # 8 ranks x N threads would oversubscribe the node's cores.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # megatron-core: with one hardware queue, communication kernels start in issue order, so the TP /
    # sequence-parallel and gradient reduce-scatter kernels overlap compute as megatron schedules them.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # Every micro-batch has its own crop length (dynamic shapes): growable segments keep the caching
    # allocator from fragmenting into out-of-memory errors.
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    # A collective that fails or times out (a dead node, a hung rank) aborts the process (SIGABRT, srun exit 134:
    # the bounded failure requeue of ms_finish), instead of hanging until the wall-time. The abort is the
    # reliable end: a rank may be stuck in a CUDA sync that no Python exception would interrupt.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # megatron-core's recommendation: NCCL buffers freed without record_stream (less memory held).
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    # WARN in production; NCCL_DEBUG=INFO on a first run prints the transport per peer: check that
    # inter-node traffic says NET/IB (GPUDirect RDMA "GDRDMA" where available), not NET/Socket.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Longer InfiniBand retransmission timeout (4.096 us x 2^22 ~ 17 s): survives a transient fabric hiccup.
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    # Site-specific, set them in the submitting shell when needed:
    #   NCCL_SOCKET_IFNAME=ib0 (or ^lo,docker0)  interface for NCCL's bootstrap (and MASTER_ADDR's traffic)
    #   NCCL_IB_HCA=mlx5_0,mlx5_1,...           only the compute-fabric HCAs (DGX A100: mlx5_0-3, 6-9; not the
    #                                           storage ones)
    #   NCCL_CROSS_NIC / NCCL_IB_GID_INDEX       RoCE fabrics: ask your admins for their values
    # torchrun's variables from the submitting shell (sbatch exports its environment to the job) would override
    # Slurm's in the driver: every task would take the same stale RANK. No torchrun here: the driver maps
    # SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID itself (megatron_speech/parallel/initialize.py).
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE ROLE_RANK ROLE_WORLD_SIZE \
          ROLE_NAME TORCHELASTIC_RUN_ID TORCHELASTIC_RESTART_COUNT TORCHELASTIC_MAX_RESTARTS
    # The first node of the allocation hosts torch.distributed's store (rank 0 runs there).
    if [[ -z ${MASTER_ADDR:-} ]]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        export MASTER_ADDR
    fi
}

# --- container (pyxis/enroot), off unless CONTAINER_IMAGE is set:
#   CONTAINER_IMAGE=/shared/images/megatron-speech.sqsh   (from `enroot import dockerd://megatron-speech:latest`,
#                                                          or a registry path: nvcr.io#nvidia/pytorch:25.01-py3)
#   CONTAINER_MOUNTS=/shared:/shared                      data, checkpoints and this checkout must be visible
#   CONTAINER_NAME=megatron-speech-$SLURM_JOB_ID            [default] pyxis keeps a named container on each node:
#                                                          the dry run's srun imports the image on the first node
#                                                          and the training step reuses it there (an unnamed one
#                                                          is imported again by every srun: two imports per job).
#                                                          The job id in the name: never a container of an older
#                                                          image, whatever pyxis's container_scope.
# The flags added to srun: --container-image, --container-name, --container-mounts, --container-workdir=REPO_DIR,
# and --no-container-mount-home (a home directory's ~/.local would shadow the image's packages).
ms_container_args() {
    MS_CONTAINER=()
    if [[ -n ${CONTAINER_IMAGE:-} ]]; then
        MS_CONTAINER=(--container-image="$CONTAINER_IMAGE"
                      --container-name="${CONTAINER_NAME:-megatron-speech-${SLURM_JOB_ID:?}}"
                      --container-workdir="$PWD" --no-container-mount-home)
        if [[ -n ${CONTAINER_MOUNTS:-} ]]; then
            MS_CONTAINER+=(--container-mounts="$CONTAINER_MOUNTS")
        fi
    fi
}

# ms_run_step CMD... : the training step, one task per GPU, in the background so that this shell can forward
# a signal sent to it (`--signal=B:USR1@N`, `scancel --batch`) to the step; sets MS_RC to srun's exit code.
ms_run_step() {
    MS_GOT_TERM=0
    # Each task first says where it runs (a hang is then easy to place), then becomes the training process
    # (exec: the same pid, so Slurm's signals reach Python directly).
    # shellcheck disable=SC2016  # expanded by each task's bash, not here
    local announce='echo "rank $SLURM_PROCID of $SLURM_NTASKS on $(hostname) (node $SLURM_NODEID,'
    # shellcheck disable=SC2016
    announce+=' local rank $SLURM_LOCALID, GPUs ${CUDA_VISIBLE_DEVICES:-none})"; exec "$@"'
    srun --label --kill-on-bad-exit=0 --wait=60 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "${MS_CONTAINER[@]}" \
        bash -c "$announce" ms-task "$@" &
    local pid=$!
    # srun forwards USR1 and TERM to every task; it is the training processes that save and exit.
    trap 'ms_log "batch shell got USR1: forwarding it to the training step"; kill -USR1 '"$pid"' 2>/dev/null' USR1
    trap 'MS_GOT_TERM=1; ms_log "batch shell got TERM: forwarding it"; kill -TERM '"$pid"' 2>/dev/null' TERM
    MS_RC=""
    while [[ -z $MS_RC ]]; do
        local status=0
        wait "$pid" || status=$?
        # `wait` also returns when a trapped signal arrives: go on waiting while srun runs.
        kill -0 "$pid" 2>/dev/null || MS_RC=$status
    done
    trap - USR1 TERM
}

# ms_requeue WHY LIMIT : requeue this job unless the batch shell got TERM or the job already restarted LIMIT times.
ms_requeue() {
    local why=$1 limit=$2 restarts=${SLURM_RESTART_COUNT:-0}
    if [[ ${MS_GOT_TERM:-0} == 1 ]]; then
        ms_log "training step exited $why after TERM to the job: Slurm ends or requeues it, not this script"
    elif (( restarts >= limit )); then
        ms_log "training step exited $why, but the job was restarted $restarts times (limit $limit):" \
               "not requeuing; resubmit to continue"
    else
        ms_log "training step exited $why: requeueing (restart $((restarts + 1)) of at most $limit)"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0  # Slurm stops this script and queues the job again
        fi
        ms_log "scontrol requeue failed: resubmit to continue"
    fi
}

# ms_finish RC : requeue on 75, 4 or a rank's death by a signal (see the protocol above), then exit with RC.
ms_finish() {
    local rc=$1 max=${MAX_REQUEUES:-20}
    local failure_max=$(( ${MAX_FAILURE_REQUEUES:-2} < max ? ${MAX_FAILURE_REQUEUES:-2} : max ))
    case $rc in
        0) ms_log "training step exited 0: done (or early-stopped)" ;;
        75) ms_requeue "75 (preempted, checkpoint saved)" "$max" ;;
        4) ms_requeue "4 (a peer rank died or hung; resuming from the last checkpoint)" "$failure_max" ;;
        3) ms_log "training step exited 3: diverged (see the log above); not requeuing" ;;
        5) ms_log "training step exited 5: a checkpoint save failed (disk full?); not requeuing" ;;
        129|1[3-8][0-9]|19[0-2])  # 128 + a signal number (1-64)
            local name why
            name=SIG$(kill -l "$((rc - 128))" 2>/dev/null || echo "$((rc - 128))")
            why="$rc (a rank was killed by $name: NCCL's watchdog abort on a failed or timed-out collective, the OOM"
            why+=" killer, srun --wait; resuming from the last checkpoint)"
            ms_requeue "$why" "$failure_max" ;;
        *) ms_log "training step failed with exit code $rc; not requeuing" ;;
    esac
    exit "$rc"
}
