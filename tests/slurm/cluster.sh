#!/usr/bin/env bash
# A real 2-node Slurm cluster on this one host, for testing launch/*.sbatch (docs/design.md §9).
#
#   tests/slurm/cluster.sh up DIR      # munged + slurmctld + slurmd -N n1 + slurmd -N n2; prints DIR/env
#   . DIR/env                          # exports SLURM_CONF (and the marker below) for sbatch/srun/squeue
#   tests/slurm/cluster.sh down DIR    # cancels jobs, stops every daemon by its pid file, then any process
#                                      # left carrying this cluster's marker; safe to call twice or after a
#                                      # failed `up`
#
# Needs root and Debian's `slurmctld slurmd slurm-client munge` (22.05). Everything this cluster writes lives
# in DIR (configs, munge key and socket, state, spool, logs, pid files); the only change outside it is a
# `127.0.0.1 n1 n2` line in /etc/hosts (added once, left in place): jobs resolve node names, e.g. MASTER_ADDR=n1.
# Ports are picked free at start-up, so two clusters (two checkouts testing at once) do not collide.
set -euo pipefail
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin  # the daemons' directory may be missing from a non-login PATH

usage() { echo "usage: $0 up|down DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$dir/slurm.conf
# Every process of this cluster (daemons, and jobs submitted with DIR/env sourced) carries this variable:
# `down` finds stragglers (slurmstepd, job tasks) by it, never by a process name.
marker="MEGATRON_SPEECH_TEST_CLUSTER=$dir"

log() { echo "[cluster $(date +%T)] $*" >&2; }

free_ports() {  # N free TCP ports on 127.0.0.1
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

pid_alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

stop_pidfiles() {  # TERM the processes named by pid files, wait up to 10 s for all, then KILL the rest
    local file pid pids=()
    for file in "$@"; do
        [[ -s $file ]] && pid=$(<"$file") && pid_alive "$pid" && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$file"
    done
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do pid_alive "$pid" && alive=1; done
        (( alive )) || return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        pid_alive "$pid" && { log "pid $pid ignored TERM: KILL"; kill -KILL "$pid" 2>/dev/null || true; }
    done
    return 0
}

marked_pids() {  # processes whose environment holds this cluster's marker (ours: we started their ancestors)
    local p
    for p in /proc/[0-9]*; do
        [[ ${p#/proc/} == "$$" ]] && continue
        { tr '\0' '\n' < "$p/environ"; } 2>/dev/null | grep -qxF "$marker" && echo "${p#/proc/}"
    done
    return 0
}

down() {
    if [[ -f $conf ]] && [[ -s $dir/slurmctld.pid ]] && pid_alive "$(<"$dir/slurmctld.pid")"; then
        # Jobs first, so that slurmstepd and the tasks end through Slurm itself.
        SLURM_CONF=$conf scancel --quiet --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 100); do
            # squeue's default states: pending, running, completing (not the finished ones it still lists)
            [[ -z $(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null | tr -d '[:space:]') ]] && break
            sleep 0.1
        done
    fi
    stop_pidfiles "$dir/slurmd-n1.pid" "$dir/slurmd-n2.pid" "$dir/slurmctld.pid"
    stop_pidfiles "$dir/munge/munged.pid"  # last: the Slurm daemons authenticate through it until they exit
    local -a left
    mapfile -t left < <(marked_pids)
    if (( ${#left[@]} )); then
        log "stopping leftover processes of this cluster: ${left[*]}"
        kill -KILL "${left[@]}" 2>/dev/null || true
    fi
    log "down ($dir)"
}

write_conf() {
    local ctld_port=$1 port1=$2 port2=$3 cpus=$4
    # One socket, `cpus` cores per fake node: with SlurmdParameters=config_overrides the two slurmd share the
    # host's cores. 8 fake GPUs per node (gres on /dev/null) so the real `--gpus-per-node=8` line is accepted.
    cat > "$conf" <<EOF
ClusterName=mstest
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job is held this long before it may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
# Quick turnaround: finished jobs leave the queue after 4 s; impossible shapes are refused at submission.
MinJobAge=4
EnforcePartLimits=ALL
KillWait=30
InactiveLimit=0
Waittime=0
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=4000 Gres=gpu:8 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port2 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=4000 Gres=gpu:8 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    cat > "$dir/gres.conf" <<EOF
NodeName=n1 Name=gpu Count=8 File=$dir/fakegpu/n1-[0-7]
NodeName=n2 Name=gpu Count=8 File=$dir/fakegpu/n2-[0-7]
EOF
}

up() {
    for bin in munged slurmctld slurmd sbatch srun scontrol squeue scancel sinfo; do
        command -v "$bin" >/dev/null || { echo "missing $bin: apt-get install slurmctld slurmd slurm-client munge" >&2; exit 1; }
    done
    [[ $(id -u) -eq 0 ]] || { echo "the test cluster needs root (SlurmUser=root, /etc/hosts)" >&2; exit 1; }
    if ! grep -Eq '^127\.0\.0\.1([[:space:]].*)?[[:space:]]n1([[:space:]]|$)' /etc/hosts \
        || ! grep -Eq '^127\.0\.0\.1([[:space:]].*)?[[:space:]]n2([[:space:]]|$)' /etc/hosts; then
        echo "127.0.0.1 n1 n2" >> /etc/hosts
    fi
    mkdir -p "$dir"/{state,spool/n1,spool/n2,log,munge,fakegpu}
    chmod 755 "$dir" "$dir/munge"  # the munge socket must be reachable; the key itself is 0400
    # Fake GPUs: character devices equal to /dev/null (gres File= needs device files).
    for n in n1 n2; do for i in 0 1 2 3 4 5 6 7; do
        [[ -e $dir/fakegpu/$n-$i ]] || mknod "$dir/fakegpu/$n-$i" c 1 3
    done; done
    export "${marker?}"
    trap 'log "bring-up failed; see $dir/log"; down' ERR

    head -c 1024 /dev/urandom > "$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"

    local ports cpus
    read -r -a ports <<< "$(free_ports 3)"
    cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))
    write_conf "${ports[0]}" "${ports[1]}" "${ports[2]}" "$cpus"
    export SLURM_CONF=$conf
    slurmctld -f "$conf" -i
    slurmd -f "$conf" -N n1
    slurmd -f "$conf" -N n2
    local state=""
    for _ in $(seq 300); do
        state=$(sinfo -h -N -o '%N=%t' 2>/dev/null | sort | tr '\n' ' ' || true)
        [[ $state == "n1=idle n2=idle " ]] && break
        sleep 0.1
    done
    if [[ $state != "n1=idle n2=idle " ]]; then
        log "nodes not idle after 30 s: '$state'"
        tail -n 20 "$dir"/log/*.log >&2 || true
        false
    fi
    cat > "$dir/env" <<EOF
export SLURM_CONF=$conf
export $marker
EOF
    trap - ERR
    log "up: 2 nodes (n1, n2) x $cpus CPUs x 8 fake GPUs; . $dir/env"
    echo "$dir/env"
}

case $action in
    up) up ;;
    down) down ;;
    *) usage ;;
esac
