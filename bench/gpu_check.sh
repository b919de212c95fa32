#!/usr/bin/env bash
# One prepared check for a machine with one GPU (Python 3.12 + a CUDA torch, maybe no package index), at most
# 8 minutes, every result in one file:
#   1. installs what is missing (megatron-core 0.16.1, numpy, pyyaml, psutil, transformers...) offline from
#      bench/wheels/ (fetched beforehand by bench/fetch_wheels.sh; the list is bench/wheels.txt) into
#      bench/.gpu_site/, never touching the system's packages;
#   2. runs the GPU checks (bench/gpu_checks.py): GPU vs CPU parity, bf16, SDPA flash attention, training steps
#      with NCCL at world size 1 (bf16, fp16), the fp16 loss scale and grad norm against fp32, the entry points;
#   3. the Transformer Engine stage (its own process): XL with TE's spec, forward/backward without and with a
#      padding mask, a local-spec checkpoint loaded into it; "SKIPPED: ..." where TE does not import;
#   4. runs the XL training-throughput benchmark at TP=1 against transformers on the same GPU, with MFU
#      (bench/train_throughput.py; each implementation isolated, bounded so that its summary always prints);
#   5. says that TP=2 needs two GPUs instead of failing, and ends with the figures docs/performance.md §5 records.
# Without a GPU (or with --dry-run) it runs the same stages on the CPU path at tiny sizes: the plumbing is tested,
# and the wheels are checked to resolve offline for Python 3.12.
#
#   bench/gpu_check.sh [--dry-run] [RESULT_FILE]     (default: $OUT/gpu_check.txt, else ./gpu_check.txt)
# Environment: PYTHON (interpreter), WHEELS_DIR (default bench/wheels), GPU_CHECK_BUDGET_S (default 480).
# Exit status: 0 all checks passed, 1 a check or the benchmark failed, 2 could not start.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
RESULT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $arg (see --help)" >&2; exit 2 ;;
        *) RESULT="$arg" ;;
    esac
done
if [ -z "$RESULT" ]; then
    RESULT="${OUT:-$PWD}/gpu_check.txt"
fi
mkdir -p "$(dirname "$RESULT")" || exit 2
RESULT="$(cd "$(dirname "$RESULT")" && pwd)/$(basename "$RESULT")"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
WHEELS="${WHEELS_DIR:-$REPO/bench/wheels}"
SITE="$REPO/bench/.gpu_site"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

left() { echo $(( BUDGET - (SECONDS - START) )); }

# stage NAME SECONDS CMD...: runs CMD bounded by SECONDS and by what is left of the budget (timeout signals the
# whole process group: benchmark workers die with it); prints its status line.
stage() {
    local name="$1" limit="$2"; shift 2
    local avail=$(( $(left) - 10 ))
    (( limit > avail )) && limit=$avail
    if (( limit < 5 )); then
        echo "== $name: SKIPPED (time budget of ${BUDGET} s spent)"
        return 124
    fi
    echo "== $name (at most ${limit} s)"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    local verdict="ok"
    (( rc == 124 || rc == 137 )) && verdict="TIMED OUT"
    (( rc != 0 && rc != 124 && rc != 137 )) && verdict="FAILED (exit $rc)"
    echo "== $name: $verdict in $(( SECONDS - t0 )) s"
    return $rc
}

pick_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

# Modules the stages import, as "distribution=import name".
CORE="megatron-core=megatron.core numpy=numpy pyyaml=yaml packaging=packaging psutil=psutil rapidfuzz=rapidfuzz
      soundfile=soundfile cffi=cffi pycparser=pycparser soxr=soxr"
HF="transformers=transformers huggingface-hub=huggingface_hub tokenizers=tokenizers safetensors=safetensors
    regex=regex tqdm=tqdm httpx2=httpx2 httpcore2=httpcore2 h11=h11 idna=idna truststore=truststore"

pin() { grep -i "^$1==" "$REPO/bench/wheels.txt" | head -1; }

install_missing() {
    local missing=() dist
    # One interpreter tries every import (one per module cost ~20 start-ups, a minute of a 15-minute device budget);
    # it prints the distributions that do not import (megatron-core: not at the pinned version).
    # shellcheck disable=SC2086  # $CORE and $HF are split into their entries on purpose
    while read -r dist; do
        [ -n "$dist" ] && missing+=("$(pin "$dist")")
    done < <("$PY" - $CORE $HF 2>/dev/null <<'PYEOF'
import importlib, sys
for entry in sys.argv[1:]:
    dist, module = entry.split("=", 1)
    try:
        imported = importlib.import_module(module)
        assert dist != "megatron-core" or imported.__version__ == "0.16.1", imported.__version__
    except Exception:
        print(dist)
PYEOF
)
    if (( DRY )) && [ ! -d "$WHEELS" ]; then
        echo "WARNING: no $WHEELS: run bench/fetch_wheels.sh before taking this tree to a GPU machine"
    elif (( DRY )); then
        echo "dry run: checking that $WHEELS resolves offline for CPython 3.12 (the GPU machine's):"
        grep -v '^\s*#' "$REPO/bench/wheels.txt" | grep -v '^\s*$' > "$WORK/requirements.txt"
        "$PY" -m pip download --quiet --no-index --find-links "$WHEELS" --only-binary=:all: --no-deps \
            --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest "$WORK/resolved" \
            -r "$WORK/requirements.txt" || { echo "$WHEELS is incomplete: run bench/fetch_wheels.sh"; return 1; }
        echo "all $(find "$WORK/resolved" -name "*.whl" | wc -l) wheels present ($(du -sh "$WHEELS" | cut -f1))"
    fi
    if (( ${#missing[@]} == 0 )); then
        echo "everything needed is importable already"
        return 0
    fi
    echo "installing into $SITE: ${missing[*]}"
    if [ ! -d "$WHEELS" ]; then
        echo "no $WHEELS: run bench/fetch_wheels.sh where an index is reachable and copy bench/wheels along"
        return 1
    fi
    mkdir -p "$SITE"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps --target "$SITE" \
            --upgrade "${missing[@]}" || return 1
    else  # no pip: a wheel is a zip archive meant to be unpacked into site-packages as it is
        "$PY" - "$WHEELS" "$SITE" "${missing[@]}" <<'EOF' || return 1
import pathlib, sys, sysconfig, zipfile
wheels, site, wanted = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
tag = "cp%d%d" % sys.version_info[:2]
for req in wanted:
    name, version = req.split("==")
    stem = name.replace("-", "_").lower() + "-" + version + "-"
    hits = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem)
            and (tag in w.name or "abi3" in w.name or "py3-none" in w.name)]
    if not hits:
        sys.exit(f"no wheel for {req} and {tag} in {wheels}")
    zipfile.ZipFile(hits[0]).extractall(site)
    print("unpacked", hits[0].name)
EOF
    fi
}

main() {
    echo "# bench/gpu_check.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    echo "source: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')" \
         "$(git -C "$REPO" status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
    if ! PY="$(pick_python)"; then
        echo "no Python with torch found (set PYTHON=...)"; return 2
    fi
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA',
torch.version.cuda, '| GPUs', torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in
range(torch.cuda.device_count())])"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
        --format=csv,noheader
    local gpus
    gpus="$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)"
    if (( gpus == 0 )) && (( ! DRY )); then
        echo "no GPU visible: running the CPU dry path"; DRY=1
    fi
    local failed=0
    echo "== install"
    install_missing || failed=1
    "$PY" -c "import megatron.core as m; print('megatron-core', m.__version__)" || failed=1

    local device=cuda
    (( DRY )) && device=cpu
    stage "GPU checks ($device)" 200 "$PY" "$REPO/bench/gpu_checks.py" --device "$device" \
        --checks gpu_vs_cpu,bf16,sdpa_flash,train_steps,fp16_scale,drivers --json "$WORK/checks.json" || failed=1
    # its own process: a TE failure (or a crash inside TE's kernels) cannot take the other stages with it
    stage "Transformer Engine ($device)" 150 "$PY" "$REPO/bench/gpu_checks.py" --device "$device" --checks te \
        --json "$WORK/te.json" || failed=1

    # the benchmark's --deadline sits inside the stage's limit: it stops starting measurements in time to print
    # its summary and MFU line, whatever failed
    local budget
    if (( DRY )); then
        budget=240
        (( budget > $(left) - 10 )) && budget=$(( $(left) - 10 ))
        stage "throughput (tiny, cpu dry run)" "$budget" "$PY" "$REPO/bench/train_throughput.py" \
            --config "$REPO/configs/tiny.yaml" --device cpu --impls ours,transformers --repeats 1 --warmup 1 \
            --steps 2 --min-time 0 --batch-size 2 --seconds 1 --deadline $(( budget - 15 )) \
            --json "$WORK/bench.json" || failed=1
    else
        # XL at TP=1: the config's per-GPU budget (1.2M samples = 5 x 15 s), bf16, ours against transformers
        budget=$(( $(left) - 30 ))
        stage "throughput (xl, tp=1, cuda)" "$budget" "$PY" "$REPO/bench/train_throughput.py" \
            --config "$REPO/configs/xl.yaml" --device cuda --precision bf16 --impls ours,transformers \
            --repeats 3 --warmup 3 --steps 10 --min-time 3 --worker-timeout 150 --deadline $(( budget - 15 )) \
            --json "$WORK/bench.json" || failed=1
    fi
    if (( gpus < 2 )); then
        echo "== TP=2: skipped: it needs 2 GPUs (NCCL refuses two ranks on one GPU); $gpus here. On a 2-GPU machine:"
        echo "   python bench/train_throughput.py --config configs/xl.yaml --tp 2 --impls ours"
    else
        stage "throughput (xl, tp=2, cuda)" 120 "$PY" "$REPO/bench/train_throughput.py" \
            --config "$REPO/configs/xl.yaml" --device cuda --tp 2 --impls ours --repeats 1 \
            --worker-timeout 110 || failed=1
    fi

    for part in checks te bench; do
        if [ -f "$WORK/$part.json" ]; then
            echo "== $part.json"
            cat "$WORK/$part.json"
        fi
    done
    echo "== figures (docs/performance.md §5)"
    "$PY" "$REPO/bench/gpu_checks.py" --figures "$WORK"
    echo "== done in $(( SECONDS - START )) s: $( (( failed )) && echo 'SOMETHING FAILED (see above)' || echo 'all passed')" \
         "$( (( DRY )) && echo '[CPU dry run: no GPU figures]')"
    return $failed
}

main 2>&1 | tee "$RESULT"
rc=${PIPESTATUS[0]}
echo "results: $RESULT"
exit "$rc"
