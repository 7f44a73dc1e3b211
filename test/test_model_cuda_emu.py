"""The CUDA model (llmc/model_cuda.cu) and the GPU rollout engine (rollout.cu), with every kernel
they launch, on the CPU: built against the emulated CUDA toolkit of test/emu_cuda/ (runtime with
stream capture and graphs, bf16, cuBLASLt) by test/model_cuda_emu.cpp and test/rollout_emu.cpp,
and linked with the GPU checks themselves, run on their tiny models:

- dev/cuda/test_model_gpu.cu --tiny: the model against the fp32 CPU reference (llmc/model.c) on
  the tiny GPT-2, Llama and Qwen2-style models (head size 16: the simple attention kernels) and a
  GPT-2 and a grouped-query Llama of head size 64 (the flash attention): logits, hidden state,
  losses and every parameter gradient within bf16 tolerances; the fused step; zero_grad; the
  second stream's schedule bit for bit; each of the model's switches (bf16 or fp32 norm-output
  gradients, bf16 or fp32 residual stream, the residual add in the products' epilogue or in the
  norm kernel, RoPE's backward in the attention or after it, RoPE's forward in the attention's
  loads or before it); the 20-step AdamW loss curves;
- dev/cuda/rollout_check.cu (without the SmolLM2 part): the engine against the CPU generator on
  the tiny GPT-2 and Llama: greedy tokens (near-tie rule), log-probs, the reference path, graphs
  off, poisoned buffers, decode_matmul, programmatic edges, pipelined steps, tuned products bit
  for bit against cuBLASLt's first choices, branches, several steps a graph launch, the
  attention's direct, early and staged loads against the default that tunes among them, the
  folded norms, and the sampler's frequencies (chi-square); gpt2:tiny64 and llama:tiny64 (head
  size 64: the flash prefill, the decode attention at the real models' head size) with prompts of
  up to 130 tokens; and TRAIN_MORA_ROLLOUT, the variable
  that sets the engine's variants for a whole run, refusing what it does not know.

Both run twice, side by side, with the emulated streams (test/emu_cuda/cuda_runtime.h) lazy
(EMU_STREAMS=lazy: each stream's work runs only when a host synchronisation or another stream's
event wait needs it) and shuffled (EMU_STREAMS=shuffle: as lazy, but the streams whose work can
run interleave at random, and each graph launch runs its nodes in a random order its captured
dependencies allow), so a missing wait between streams, a missing edge between the chains of a
captured graph (the rollout's branches), two chains sharing a buffer, or a host read of a copy
not waited for, reads NaN or stale data and fails a check. The lazy run takes each launch's
blocks in reverse order, the shuffled run in random orders (EMU_BLOCKS), so blocks of one kernel
that depend on each other's order show too; and every launch is held to CUDA's shared memory
limits a block (48 KiB unless the kernel's limit was raised), which a GPU enforces by refusing it.

Built with EMU_SANITIZE=address,undefined (test/gpu_emu.py), every program here runs under
AddressSanitizer and UBSan with device buffers of their exact size, so a read past a buffer or a
misaligned vector access stops it; test_sanitized_emulation_reports_bad_accesses shows that it
does, on kernels of its own.

So the host code (buffers, the order of kernels, graphs, the switches, the waits between
streams) is checked on every machine, not only where a GPU is. What the emulation does not
reproduce: cuBLASLt's own summation orders (its products follow the library's documented
semantics, with one candidate algorithm that sums in another order, which the tuners must tell
apart), streams running truly side by side, timings (the flash tuner keeps its defaults), and
speed."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT
from gpu_emu import rewrite_launches, sanitizer_flags

MODEL_OBJECTS = ["model", "ops_cpu", "matmul", "utils", "comm"]
ROLLOUT_OBJECTS = ["model", "ops_cpu", "matmul", "utils", "generate", "checkpoint", "gguf", "safetensors", "chat_template",
                   "unicode_tables", "tokenizer"]
CXX_FLAGS = ["-std=c++17", "-O2", "-U_FORTIFY_SOURCE", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", "-Wno-comment",
             "-Wno-sign-compare", "-Wno-unused-function", "-Wno-maybe-uninitialized", "-Wno-format-truncation"]


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    """The emulated programs by name: model_cuda_emu (test_model_gpu) and rollout_emu
    (rollout_check), built two compilations at a time."""
    cc, cxx = shutil.which("gcc"), shutil.which("g++")
    if cc is None or cxx is None:
        pytest.skip("gcc and g++ are needed to build the emulated model")
    build = tmp_path_factory.mktemp("cuda_emu")
    llmc = ROOT / "llmc"
    # every header the engine includes, the model and the rollout engine, with their launches
    # rewritten, in one directory searched first: they include one another from there
    for src in sorted(llmc.glob("*.cuh")) + [llmc / "cuda_common.h"]:
        (build / src.name).write_text(rewrite_launches(src.read_text(), 0))
    (build / "model_cuda_launched.cu").write_text(rewrite_launches((llmc / "model_cuda.cu").read_text(), 1))
    (build / "rollout_launched.cu").write_text(rewrite_launches((ROOT / "rollout.cu").read_text(), 1))
    emu = ["-I", str(ROOT / "test" / "emu_cuda"), "-I", str(ROOT / "test")]
    plain = ["-I", str(llmc), "-I", str(ROOT)]
    sanitize = sanitizer_flags()   # EMU_SANITIZE
    jobs, objects = [], {}
    # the CPU reference, generator and loaders the checks link
    for src in [llmc / f"{n}.c" for n in sorted(set(MODEL_OBJECTS + ROLLOUT_OBJECTS) - {"tokenizer"})] + [ROOT / "tokenizer.c"]:
        obj = build / f"{src.stem}.o"
        jobs.append([cc, "-std=gnu11", "-O2", "-fopenmp", *sanitize, *plain, "-c", str(src), "-o", str(obj)])
        objects[src.stem] = obj
    for name, src, flags in (("model_cuda_emu", ROOT / "test" / "model_cuda_emu.cpp", ["-I", str(build), *emu]),
                             ("rollout_emu", ROOT / "test" / "rollout_emu.cpp", ["-I", str(build), *emu]),
                             ("test_model_gpu", ROOT / "dev" / "cuda" / "test_model_gpu.cu", []),
                             ("rollout_check", ROOT / "dev" / "cuda" / "rollout_check.cu",
                              ['-DEMU_PROGRAM="rollout_check"', *emu])):
        obj = build / f"{name}.o"
        jobs.append([cxx, *CXX_FLAGS, *sanitize, *flags, *plain, "-c", "-x", "c++", str(src), "-o", str(obj)])
        objects[name] = obj
    running = []
    for job in jobs:   # two at a time
        running.append(subprocess.Popen(job))
        if len(running) == 2:
            assert running.pop(0).wait() == 0, "building the emulated CUDA programs failed"
    assert all(p.wait() == 0 for p in running), "building the emulated CUDA programs failed"
    exes = {name: build / name for name in ("model_cuda_emu", "rollout_emu")}
    subprocess.run([cxx, "-fopenmp", *sanitize, "-o", str(exes["model_cuda_emu"]), str(objects["model_cuda_emu"]),
                    str(objects["test_model_gpu"]), *(str(objects[n]) for n in MODEL_OBJECTS), "-lm"], check=True)
    subprocess.run([cxx, "-fopenmp", *sanitize, "-o", str(exes["rollout_emu"]), str(objects["rollout_emu"]), str(objects["rollout_check"]),
                    *(str(objects[n]) for n in ROLLOUT_OBJECTS), "-lcjson", "-lm"], check=True)
    return exes


def test_lazy_streams_catch_missing_waits(tmp_path):
    """EMU_STREAMS=lazy and shuffle (the checks below run with both) must make a missing wait
    read wrong data (test/emu_streams_check.cpp), shuffle also a missing wait on a stream created
    later and a missing edge between two streams' branches, eager or captured; programs with their
    waits read the right data in every mode; a capture that leaves a stream's work unjoined is
    refused in every mode."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is needed to build the emulated runtime's check")
    exe = tmp_path / "emu_streams_check"
    subprocess.run([cxx, *CXX_FLAGS, *sanitizer_flags(), "-I", str(ROOT / "test" / "emu_cuda"), "-I", str(ROOT / "test"), "-o", str(exe),
                    str(ROOT / "test" / "emu_streams_check.cpp")], check=True)
    missing = {"issue": set(), "lazy": {"cross-stream no wait", "event sync missing", "legacy copy nonblocking"}}
    missing["shuffle"] = missing["lazy"] | {"older stream no wait", "branch forked early", "graph branch no edge"}
    for mode in ("issue", "lazy", "shuffle"):
        env = dict(os.environ, EMU_STREAMS=mode)
        env.pop("EMU_SEED", None)
        run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 0, run.stderr
        got = dict(line.split(": ") for line in run.stdout.splitlines())
        assert len(got) == 13, run.stdout
        for case, read in got.items():
            expect = "wrong" if case in missing[mode] else "ok"
            assert read == expect, f"EMU_STREAMS={mode} {case}: read {read}, expected {expect}"
        run = subprocess.run([str(exe), "unjoined"], capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode != 0 and "was not joined back" in run.stderr, (mode, run.stdout, run.stderr)


def build_launch_check(tmp_path, flags):
    """test/emu_launch_check.cpp with its kernels rewritten as the engine's are, built with the
    compiler flags `flags` besides CXX_FLAGS into tmp_path; skips when g++ is missing."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is needed to build the emulated runtime's check")
    (tmp_path / "emu_launch_kernels_launched.cuh").write_text(
        rewrite_launches((ROOT / "test" / "emu_launch_kernels.cuh").read_text(), 5))
    exe = tmp_path / "emu_launch_check"
    subprocess.run([cxx, *CXX_FLAGS, *flags, "-I", str(ROOT / "test" / "emu_cuda"), "-I", str(ROOT / "test"), "-I", str(tmp_path),
                    "-o", str(exe), str(ROOT / "test" / "emu_launch_check.cpp")], check=True)
    return exe


def test_launches_block_order_and_shared_memory_limits(tmp_path):
    """EMU_BLOCKS runs a launch's blocks forward, in reverse or shuffled (another order for
    another EMU_SEED), and a launch is refused where a GPU refuses it: static and dynamic shared
    memory past 48 KiB without the kernel's limit raised when the launch is issued, dynamic past
    the raised limit, or both past what a block may ever take (227 KiB, or EMU_SMEM_OPTIN bytes)
    (test/emu_launch_check.cpp, its kernels rewritten as the engine's are)."""
    exe = build_launch_check(tmp_path, sanitizer_flags())

    def run(case, **env):
        base = {k: v for k, v in os.environ.items() if k not in ("EMU_BLOCKS", "EMU_SEED", "EMU_STREAMS", "EMU_SMEM_OPTIN")}
        return subprocess.run([str(exe), case], capture_output=True, text=True, env=dict(base, **env), timeout=60)

    def order(**env):
        proc = run("order", **env)
        assert proc.returncode == 0, proc.stderr
        return [int(b) for b in proc.stdout.split(":")[1].split()]

    assert order() == list(range(24)) and order(EMU_BLOCKS="forward") == list(range(24))
    assert order(EMU_BLOCKS="reverse") == list(range(23, -1, -1))
    shuffled = [order(EMU_BLOCKS="shuffle", EMU_SEED=str(seed)) for seed in (1, 2)]
    assert all(sorted(o) == list(range(24)) for o in shuffled)
    assert shuffled[0] != shuffled[1] and list(range(24)) not in shuffled
    assert shuffled[0] == order(EMU_BLOCKS="shuffle", EMU_SEED="1")
    bad = run("order", EMU_BLOCKS="sideways")
    assert bad.returncode != 0 and "EMU_BLOCKS must be" in bad.stderr
    for case in ("static40+dyn8", "raised"):
        proc = run(case)
        assert proc.returncode == 0 and proc.stdout == "ok\n", (case, proc.stderr)
    for case, message in (("static40+dyn16", "static_40k: 40960 bytes of static and 16384 of dynamic shared memory pass "
                                             "the 49152 a block may take unless cudaFuncAttributeMaxDynamicSharedMemorySize"),
                          ("raised-short", "static_40k: 16384 bytes of dynamic shared memory, its "
                                           "cudaFuncAttributeMaxDynamicSharedMemorySize 8192"),
                          ("past-optin", "static_40k: 40960 bytes of static and 194560 of dynamic shared memory pass "
                                         "the 232448")):
        proc = run(case)
        assert proc.returncode != 0 and message in proc.stderr, (case, proc.stdout, proc.stderr)
    # a card whose blocks may take less (EMU_SMEM_OPTIN): 40 + 16 KiB does not fit in 48 KiB even raised
    proc = run("raised", EMU_SMEM_OPTIN="49152")
    assert proc.returncode != 0 and "16384 of dynamic shared memory pass the 49152 a block may take" in proc.stderr, proc.stderr
    proc = run("static40+dyn8", EMU_SMEM_OPTIN="100")
    assert proc.returncode != 0 and "EMU_SMEM_OPTIN must be" in proc.stderr, proc.stderr
    # the limit in force when the launch is issued counts, not when a lazy stream runs it
    for streams in ("issue", "lazy"):
        proc = run("raised-late", EMU_STREAMS=streams)
        assert proc.returncode != 0 and "unless cudaFuncAttributeMaxDynamicSharedMemorySize is raised" in proc.stderr, \
            (streams, proc.stdout, proc.stderr)


def test_sanitized_emulation_reports_bad_accesses(tmp_path):
    """Built with EMU_SANITIZE's sanitizers (address, undefined), the emulation stops at what a GPU
    would fault on or read garbage from and the plain emulation lets pass: a read one element past
    a device buffer (the emulated cudaMalloc then allocates the exact size), a float4 load from an
    address that is not 16-byte aligned, a write past a block's dynamic shared memory; the same
    kernels within bounds run clean, as do the launches of the other cases (threads' stacks reused
    block after block, static shared memory filled before every block)."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is needed to build the emulated runtime's check")
    flags = sanitizer_flags("address,undefined")
    probe = subprocess.run([cxx, *flags, "-x", "c++", "-", "-o", str(tmp_path / "probe")], input="int main() { return 0; }",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("this compiler cannot build with the address and undefined-behaviour sanitizers: " + probe.stderr[-300:])
    exe = build_launch_check(tmp_path, flags)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    for name in ("EMU_BLOCKS", "EMU_SEED", "EMU_STREAMS", "EMU_SMEM_OPTIN"):
        env.pop(name, None)
    for case in ("in-bounds", "aligned", "shared-in-bounds", "static40+dyn8", "raised"):
        for blocks in ("forward", "shuffle"):
            proc = subprocess.run([str(exe), case], capture_output=True, text=True, env=dict(env, EMU_BLOCKS=blocks), timeout=120)
            assert proc.returncode == 0 and proc.stdout == "ok\n", (case, blocks, proc.stderr[-3000:])
    proc = subprocess.run([str(exe), "order"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("order: 0 1 2"), proc.stderr[-3000:]
    for case, message in (("past-end", "heap-buffer-overflow"), ("misaligned", "misaligned address"),
                          ("shared-past-end", "heap-buffer-overflow")):
        proc = subprocess.run([str(exe), case], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, (case, proc.stdout, proc.stderr[-3000:])


def emulated_env(streams):
    """The environment of an emulated run with the streams `streams`, the blocks reversed when
    they are lazy and shuffled when they are, and every engine switch at its default."""
    blocks = {"lazy": "reverse", "shuffle": "shuffle"}.get(streams, "forward")
    env = dict(os.environ, TRAIN_MORA_FLASH_TUNE="0", OMP_NUM_THREADS="1", EMU_STREAMS=streams, EMU_BLOCKS=blocks)
    for name in list(env):   # every switch at its default, as a GPU run has them
        if name.startswith("TRAIN_MORA_") and name != "TRAIN_MORA_FLASH_TUNE" or name in ("SMOLLM2_GGUF", "EMU_SEED", "EMU_SMEM_OPTIN"):
            del env[name]
    return env


def run_check(exe, *args):
    """Runs the check twice side by side (one core each), with the streams lazy and shuffled:
    lazy shows every wait missing before a read, shuffle the orders lazy never takes. Returns the
    lazy run's output."""
    runs = {mode: subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=emulated_env(mode)) for mode in ("lazy", "shuffle")}
    outs = {mode: run.communicate(timeout=2400) for mode, run in runs.items()}
    for mode, (stdout, stderr) in outs.items():
        print(f"== EMU_STREAMS={mode} EMU_BLOCKS={emulated_env(mode)['EMU_BLOCKS']}\n{stdout}")
        failed = [line for line in stdout.splitlines() if line.startswith("FAIL")]
        assert runs[mode].returncode == 0 and not failed, \
            f"EMU_STREAMS={mode}: exit {runs[mode].returncode}: {failed}\n{stderr[-2000:]}"
    return outs["lazy"][0]


def test_model_gpu_on_the_emulated_gpu(emulators):
    out = run_check(emulators["model_cuda_emu"], "--tiny")
    assert re.search(r"== test_model_gpu: PASS \(0 failed checks\)", out)
    # every part ran: the three models, each switch flipped, the loss curves
    flash = ("gpt2:tiny64 (flash)", "llama:tiny64 (flash, grouped)")
    for label in ("gpt2:tiny", "llama:tiny", "qwen2-style tiny") + flash:
        assert re.search(rf"PASS {re.escape(label)}.* grad norm", out), label
        assert re.search(rf"PASS {re.escape(label)}.* fp32 residual stream step all grads", out), label
        assert re.search(rf"PASS {re.escape(label)}.* residual add in the norm kernel step all grads", out), label
        assert re.search(rf"PASS {re.escape(label)}.* fp32 norm-output gradients step all grads", out), label
        for where in ("aside", "on main"):
            assert re.search(rf"PASS {re.escape(label)}.* overlapped step, column sums {where} other grads +0 of", out), label
        for when in ("one step", "two steps, the second with the sums", "zero_grad after them"):
            assert re.search(rf"PASS {re.escape(label)}.* grad norm from the backward's sums, {when} ", out), (label, when)
        # the models for forwards alone: against the CPU, and bit for bit against the training model
        for name in ("inference model", "inference model without head"):
            assert re.search(rf"PASS {re.escape(label)}.* {name} hidden", out), (label, name)
            assert re.search(rf"PASS {re.escape(label)}.* {name}: 0 values differ from the training model's", out), (label, name)
        assert re.search(rf"PASS {re.escape(label)}.* inference model token losses", out), label
        assert re.search(rf"PASS {re.escape(label)}.* inference model, \d+ of \d+ rows, token losses", out), label
    for label in ("llama:tiny", "qwen2-style tiny", flash[1]):
        assert re.search(rf"PASS {re.escape(label)}.* RoPE backward in the attention other grads +0 of", out), label
        assert re.search(rf"PASS {re.escape(label)}.* RoPE forward in the attention step mean loss", out), label
        assert re.search(rf"PASS {re.escape(label)}.* RoPE forward in the attention other grads +0 of", out), label
    for label in ("gpt2:tiny", "llama:tiny (3 layers)"):
        assert re.search(rf"PASS {re.escape(label)} GPU loss curve follows the CPU's", out), label
        assert re.search(rf"PASS {re.escape(label)} parameter updates over 20 steps", out), label
        for check in ("losses over 20 steps", "parameters after 20 steps", "first moments", "second moments"):
            assert re.search(rf"PASS {re.escape(label)} update beside the next forward: {check}", out), (label, check)


@pytest.mark.parametrize("name, value, message", [
    ("TRAIN_MORA_UPDATE_LAYERS", "0", "expected a whole number of layers, at least 1"),
    ("TRAIN_MORA_UPDATE_LAYERS", "2x", "expected a whole number of layers, at least 1"),
    ("TRAIN_MORA_OVERLAP_UPDATE", "yes", "expected 0 or 1"),
    ("TRAIN_MORA_ROPE_IN_ATTENTION", "2", "expected 0 or 1"),
    ("TRAIN_MORA_NORM_IN_BACKWARD", "on", "expected 0 or 1"),
    ("TRAIN_MORA_SUMS_ASIDE", "2", "expected 0 or 1"),
])
def test_model_switches_from_the_environment_refused(emulators, name, value, message):
    """A model switch or count in the environment that is not one its variable takes stops the first
    CUDA model's creation with a message naming the variable and the value, and a non-zero exit."""
    env = dict(emulated_env("issue"), **{name: value})
    proc = subprocess.run([str(emulators["model_cuda_emu"]), "--tiny"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    assert f"{name}={value}" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]


def test_rollout_check_on_the_emulated_gpu(emulators):
    out = run_check(emulators["rollout_emu"])
    assert re.search(r"== rollout_check: PASS \(0 failed checks\)", out)
    for preset in ("gpt2:tiny", "llama:tiny"):
        for check in ("fast +greedy tokens", "graphs off vs on", "reference path", "pdl vs fast",
                      "untuned vs tuned products", "2 branches", "4 steps a launch vs 1", "8 steps a launch, stops",
                      "direct-loads attention vs default", "early-loads attention vs default",
                      "staged attention vs default",
                      "first-token frequencies T=0.8 top-k 0 ",
                      "rounded CPU forward: unrounded"):
            assert re.search(rf"PASS {re.escape(preset)} {check}", out), f"{preset} {check}"
    for check in ("folded norms +greedy tokens", "folded norms, 2 branches", "folded norms, 4 steps a launch",
                  "folded norms, staged attention vs default", "engine defaults vs folded norms"):
        assert re.search(rf"PASS llama:tiny {check}", out), check
    # head size 64: the flash prefill over several tiles and SmolLM2's decode attention shape
    for preset in ("gpt2:tiny64", "llama:tiny64"):
        for check in ("fast +greedy tokens", "fast +log-probs", "graphs off vs on", "direct-loads attention vs default",
                      "early-loads attention vs default", "staged attention vs default"):
            assert re.search(rf"PASS {preset} {check}", out), f"{preset} {check}"
    for check in ("folded norms +greedy tokens", "folded norms, 2 branches", "folded norms, 4 steps a launch",
                  "folded norms, staged attention vs default", "engine defaults vs folded norms"):
        assert re.search(rf"PASS llama:tiny64 {check}", out), check
    for heads in ("NH=2 NKV=2", "NH=2 NKV=1"):
        assert re.search(rf"decode attention {heads} HS=64 max_len=154 rows=\d+ splits=1: .* -> (direct|early|staged)", out)
    # the decode attention's loads were tuned (the default), plain and folded, and a variant chosen
    assert re.search(r"decode attention NH=\d+ NKV=\d+ HS=\d+ max_len=\d+ rows=\d+ splits=1: direct [\d.]+ us, "
                     r"early [\d.]+, staged [\d.]+ -> (direct|early|staged)", out)
    assert re.search(r"decode attention .* \(rows' norm\): .* -> (direct|early|staged)", out)



@pytest.mark.parametrize("value, message", [
    ("staged_loads,bogus", "unknown variant 'bogus'"),
    ("branches=9", "'branches=9' needs a whole number in 1..4 after 'branches='"),
    ("steps=", "'steps=' needs a whole number in 1..8 after 'steps='"),
])
def test_rollout_variants_from_the_environment_refused(emulators, value, message):
    """TRAIN_MORA_ROLLOUT with a word the engine does not know, or a count outside its range, stops
    at the first engine with a message naming the variable and the word, and a non-zero exit."""
    env = dict(emulated_env("issue"), TRAIN_MORA_ROLLOUT=value)
    proc = subprocess.run([str(emulators["rollout_emu"])], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    assert f"TRAIN_MORA_ROLLOUT={value}" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]


def test_rollout_variants_from_the_environment_taken(emulators):
    """A valid TRAIN_MORA_ROLLOUT is read when the first engine is made, and says what it set:
    here the staged attention loads with 2 branches, 4 steps a launch and the norm kernels instead
    of the folded norms (the run is stopped once the line is out)."""
    env = dict(emulated_env("issue"), TRAIN_MORA_ROLLOUT="staged_loads,branches=2,steps=4,norm_kernels")
    proc = subprocess.Popen([str(emulators["rollout_emu"])], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = ""
        for line in proc.stderr:
            if line.startswith("rollout: TRAIN_MORA_ROLLOUT="):
                break
    finally:
        proc.kill()
        proc.wait()
    assert "branches 2" in line and "steps a graph 4" in line and "attention loads staged" in line, line
    assert "folded norms 0" in line, line
