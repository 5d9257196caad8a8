#!/usr/bin/env bash
# GPU check: run on a machine with one CUDA GPU, from the repository root.
#
#   bash benchmarks/gpu_check.sh [PYTHON]        (default PYTHON: .venv/bin/python)
#
# Budget: <= 8 minutes on one GPU. Prints a markdown "RESULTS" section at the end, to paste
# into docs/benchmarks/gpu.md:
#   1. the likelihood comparison on CUDA (benchmarks/gpu_likelihood.py): today's augmented
#      exact trace, the quadrature default, Hutchinson variants, the Score-SDE scipy design
#      with its host round trip per evaluation;
#   2. a CIFAR-10-size U-Net's likelihood per image;
#   3. training images/s in fp32 / bf16 / fp16, VP and a learned VDM schedule;
#   4. one short pass of every CLI command on a run trained with train.device=cuda: train,
#      resume, sample with each sampler, likelihood (ode, elbo, scoreflow, vlb), inpaint,
#      colorize, train-classifier, guided sampling, and torchrun with 1 process (which makes
#      the evaluation commands run on cuda:0 — one plain process evaluates on the CPU).
# Each step is timed and marked PASS/FAIL; a failure does not stop the others; the exit status
# is the number of failed steps (2 with a clear message when there is no CUDA device).
set -uo pipefail

PY="${1:-.venv/bin/python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False with $PY): run it on a GPU machine" >&2
    exit 2
fi
BIN="$(dirname "$PY")"
SDELAB=("$PY" -m sdelab.cli)
TORCHRUN=("$BIN/torchrun" --standalone --nproc_per_node 1 -m sdelab.cli)
[ -x "$BIN/torchrun" ] || TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m sdelab.cli)
W="$(mktemp -d /tmp/sdelab_gpu_check.XXXXXX)"
LOG="$W/log.txt"
START=$(date +%s)
declare -a ROWS=()
FAILED=0

step() {  # step NAME TIMEOUT_S CMD...: run, time, record PASS/FAIL
    local name="$1" limit="$2"; shift 2
    local t0=$(date +%s.%N)
    echo "== $name: $*" >>"$LOG"
    if timeout "$limit" "$@" >>"$LOG" 2>&1; then status=PASS; else status="FAIL (rc $?)"; FAILED=$((FAILED + 1)); fi
    local dt=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}")
    ROWS+=("| $name | $status | $dt |")
    echo "$name: $status (${dt}s)"
}

echo "work dir: $W (full log: $LOG)"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)

# ---- 1-3: likelihood and training throughput on CUDA ----------------------------------------
step "likelihood + throughput tables" 300 "$PY" benchmarks/gpu_likelihood.py --device cuda
TABLES=$(sed -n '/^### Likelihood on/,$p' "$LOG")

# ---- 4: every CLI command, short ---------------------------------------------------------------
C="$W/checker"
step "train (toy, cuda)" 60 "${SDELAB[@]}" train toy/checkerboard train.device=cuda \
    train.steps=300 train.ckpt_every=150 train.log_every=100 --out "$C"
step "train --resume" 60 "${SDELAB[@]}" train toy/checkerboard train.device=cuda \
    train.steps=400 train.ckpt_every=200 --out "$C" --resume
for s in euler_maruyama reverse_diffusion ancestral pc ode dpm_solver lambda annealed_langevin; do
    step "sample --sampler $s" 60 "${SDELAB[@]}" sample "$C" --sampler "$s" --n 256 --steps 20 \
        --out "$W/s_$s.npy"
done
step "sample --sampler ode (torchrun 1 process: cuda:0)" 90 "${TORCHRUN[@]}" sample "$C" \
    --sampler ode --n 256 --steps 20 --out "$W/s_tr.npy"
for m in ode elbo scoreflow; do
    step "likelihood --method $m (torchrun: cuda:0)" 90 "${TORCHRUN[@]}" likelihood "$C" \
        --method "$m" --n 256 --batch-size 128
done
step "likelihood --method ode (1 process)" 90 "${SDELAB[@]}" likelihood "$C" --n 128
step "inpaint (torchrun: cuda:0)" 60 "${TORCHRUN[@]}" inpaint "$C" --known 0=1.0 --n 64 \
    --steps 20 --out "$W/inp.npy"
step "train-classifier (cuda)" 90 "${SDELAB[@]}" train-classifier "$C" --steps 100 --out "$W/clf"
step "sample --class 1 --classifier (torchrun: cuda:0)" 60 "${TORCHRUN[@]}" sample "$C" \
    --class 1 --classifier "$W/clf" --n 64 --steps 20 --out "$W/s_cls.npy"
V="$W/vdm"
step "train vdm_moons (learned γ, cuda)" 90 "${SDELAB[@]}" train toy/vdm_moons \
    train.device=cuda train.steps=200 train.ckpt_every=200 --out "$V"
step "likelihood --method vlb (torchrun: cuda:0)" 60 "${TORCHRUN[@]}" likelihood "$V" \
    --method vlb --n 256
R="$W/rgb"
step "write tinted digits (RGB folder)" 60 "$PY" -c \
    "import sys; sys.path.insert(0, 'benchmarks'); from bench_colorize import write_tinted_digits; from pathlib import Path; write_tinted_digits(Path('$W/tinted'))"
step "train images/digits RGB folder (cuda, bf16)" 120 "${SDELAB[@]}" train images/digits \
    data.name=folder "data.options={root: $W/tinted, channels: 3, size: 8, data_range: '[-1,1]'}" \
    train.device=cuda train.mixed_precision=bf16 train.steps=100 train.ckpt_every=100 --out "$R"
"$PY" -c "
import numpy as np; from PIL import Image
img = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype('uint8')
Image.fromarray(img, mode='RGB').save('$W/photo.png')" >>"$LOG" 2>&1
step "colorize (torchrun: cuda:0)" 60 "${TORCHRUN[@]}" colorize "$R" --image "$W/photo.png" \
    --n 4 --steps 20 --out "$W/col.png"
step "torchrun 1 process: train (cuda)" 90 "${TORCHRUN[@]}" train toy/checkerboard \
    train.device=cuda train.steps=100 train.ckpt_every=100 --out "$W/tr"

END=$(date +%s)
echo
echo "================================ RESULTS ================================"
echo "## GPU check"
echo
echo "\`$(date -u '+%Y-%m-%d %H:%M') UTC\`, ${GPU_NAME:-unknown GPU}, torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'), total $((END - START)) s, $FAILED failed step(s). Command: \`bash benchmarks/gpu_check.sh\`"
echo
echo "$TABLES"
echo
echo "### CLI on CUDA"
echo
echo "| step | status | s |"
echo "|---|---|---:|"
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
