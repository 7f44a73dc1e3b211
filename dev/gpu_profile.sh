#!/usr/bin/env bash
# Where the time goes, per kernel, on the GPU machine: Nsight Compute over the first launches of
# a training step (bench_train, B=16 T=1024) and of generation (bench_rollout, B=64: the prefill
# and the first decode steps), for GPT-2 124M and the SmolLM2-135M shape, each printed as a table
# by dev/ncu_summary.py (total and mean time, DRAM and SM throughput as % of peak). Nsight Compute
# replays each kernel and locks the clocks at base: the times are for comparing kernels, the
# benchmarks' own figures are the speeds. The model runs skip the flash attention's and the
# products' tuning (TRAIN_MORA_FLASH_TUNE=0, TRAIN_MORA_MATMUL_TUNE=0), whose candidates would
# otherwise fill the launches profiled; they run the defaults. At most about 7 minutes (each run
# stops after 100 s).
#
#   bash dev/gpu_profile.sh [LAUNCHES] [NAME...]   (default 400 launches a run; NAMEs pick runs
#                                                  among train_gpt2 train_smollm2 rollout_gpt2
#                                                  rollout_smollm2, default all four)
#
# When $OUT is set (the device tool's output folder) the raw ncu reports are also written there.
set -u
cd "$(dirname "$0")/.."
launches=${1:-400}
[ $# -gt 0 ] && shift
case "$launches" in ''|*[!0-9]*) echo "gpu_profile: LAUNCHES must be a number, not '$launches'"; exit 2;; esac
runs=" ${*:-train_gpt2 train_smollm2 rollout_gpt2 rollout_smollm2} "
for name in $runs; do
    case "$name" in train_gpt2|train_smollm2|rollout_gpt2|rollout_smollm2) ;;
        *) echo "gpu_profile: unknown run '$name' (train_gpt2 train_smollm2 rollout_gpt2 rollout_smollm2)"; exit 2;; esac
done
. dev/gpu_env.sh || exit 1
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -1)
if [ -z "$ncu" ]; then echo "gpu_profile: Nsight Compute (ncu) not found"; exit 1; fi
make -j"$(nproc)" USE_MPI=0 build/cuda/dev/bench_train build/cuda/dev/bench_rollout \
    NVCCFLAGS="-O3 -std=c++17 --generate-code arch=compute_90a,code=sm_90a -lineinfo" > build/gpu_profile_build.log 2>&1 ||
    { tail -20 build/gpu_profile_build.log; echo "gpu_profile: build failed"; exit 1; }
dir=${OUT:-/tmp/gpu_profile}
mkdir -p "$dir"
metrics=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed
profile() {   # NAME PROGRAM ARGS...: one ncu run, then its table
    local name=$1
    shift
    [[ "$runs" == *" $name "* ]] || return 0
    echo "== $name: the first $launches kernel launches"
    # no tuning runs: their hundreds of candidate launches would be the first launches profiled
    TRAIN_MORA_FLASH_TUNE=0 TRAIN_MORA_MATMUL_TUNE=0 \
    timeout 100 "$ncu" --graph-profiling node --launch-count "$launches" --print-summary per-kernel --metrics "$metrics" \
        "$@" > "$dir/ncu_$name.txt" 2>&1
    python3 dev/ncu_summary.py "$dir/ncu_$name.txt" | head -25
}
profile train_gpt2 build/cuda/dev/bench_train 1 gpt2:d12
profile train_smollm2 build/cuda/dev/bench_train 1 llama:smollm2-135m
profile rollout_gpt2 build/cuda/dev/bench_rollout 1 gpt2:d12 64
profile rollout_smollm2 build/cuda/dev/bench_rollout 1 llama:smollm2-135m 64
