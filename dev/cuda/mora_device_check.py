"""`train_mora mora --device cuda` against `--device cpu` on the same seed (run by dev/gpu_check.sh).

The demo's world gives a small trained byte-level model and its reward heads (a short demo run).
The GPU cannot repeat the CPU's samples (it draws from its own Philox streams and computes in
bf16), so two comparisons:

- the update, on the same data: a DPO run stopped on the CPU after step 1 (its pool_state.json
  holds the best/worst pairs, its checkpoint the policy and AdamW state) is copied and resumed
  once on the CPU and once with --device cuda. A DPO step samples nothing, so steps 2 and 3 see
  the same pairs and start from the same weights: their loss, KL, margin and gradient norm must
  agree within bf16 tolerance (5% relative; the KL to 10% of max(|KL|, 1e-3); the margin, a sum
  of log-probs, also to 0.03 nats times the square root of its tokens), step 3 after an
  update made on the GPU; a third copy resumed on the GPU through the data-parallel path
  (TRAIN_MORA_NCCL=1: one rank, the gradient summed over NCCL) must agree with the plain GPU run
  to float rounding (1e-3 relative);
- the sampling, in distribution: the same GRPO run (2 steps, temperature 1) on both devices; the
  presample's mean raw reward per dimension (every prompt x K responses, scored by the same heads,
  on the CPU's reference in one run and the GPU's in the other) must agree within 4 standard
  errors of the difference; the GPU run's first step (policy == reference up to bf16) has a KL
  below 1e-2, its second (after a GPU update) a KL above the first's, every figure finite.

usage: python3 dev/cuda/mora_device_check.py ./train_mora WORKDIR     exit 0 on PASS
       (MORA_DEVICE_WORLD=DIR: use that `train_mora demo --pretrain_steps 300 --steps 1` output;
       MORA_DEVICE_NO_NCCL=1: a build without NCCL, such as ./train_mora linked against the CPU
       emulation's model and rollout engine (test/model_cuda_emu.cpp, test/rollout_emu.cpp; built
       by dev/emu_build.sh): the NCCL comparison is skipped with a SKIP line)
"""
import json
import math
import os
import shutil
import subprocess
import sys


def run(cmd, log, env=None):
    with open(log, "w") as f:
        # seconds on a GPU; the emulation (dev/emu_build.sh) scores and samples at a few dozen
        # tokens a second, and its GRPO run takes about 15 minutes
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=2400,
                           env=None if env is None else {**os.environ, **env})
    if p.returncode != 0:
        print(open(log).read()[-3000:])
        print(f"FAIL mora_device: {' '.join(cmd[1:4])} ... exited {p.returncode} (log {log})")
        sys.exit(1)


def read_jsonl(path):
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip()]


def verdict(good):
    return "PASS" if good else "FAIL"


def main():
    exe, work = sys.argv[1], sys.argv[2]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    world = os.path.join(work, "world")
    given = os.environ.get("MORA_DEVICE_WORLD")
    if given:   # a demo run made elsewhere with the same arguments (the CPU part, done ahead)
        shutil.copytree(given, world)
    else:
        run([exe, "demo", "--out", world, "--pretrain_steps", "300", "--steps", "1"], f"{work}/demo.log")
    common = [exe, "mora", "--model", f"{world}/base/model.ckpt", "--heads", f"{world}/heads/reward_heads.bin",
              "--prompts", f"{world}/world/train_prompts.jsonl", "--chat_template", "plain", "--stop", "\n",
              "--K", "4", "--candidates", "2", "--rewrite_K", "2", "--max_new_tokens", "48",
              "--rewrite_max_new_tokens", "48", "--prompts_per_step", "4", "--group_size", "4", "--lr", "5e-4",
              "--seed", "3"]
    ok = True

    # the update on the same pairs
    run([*common, "--algo", "dpo", "--steps", "3", "--stop_after", "1", "--out", f"{work}/dpo_cpu"], f"{work}/dpo.log")
    shutil.copytree(f"{work}/dpo_cpu", f"{work}/dpo_cuda")
    shutil.copytree(f"{work}/dpo_cpu", f"{work}/dpo_nccl")
    run([exe, "mora", "--resume", f"{work}/dpo_cpu"], f"{work}/dpo_cpu.log")
    run([exe, "mora", "--resume", f"{work}/dpo_cuda", "--device", "cuda"], f"{work}/dpo_cuda.log")
    # the data-parallel GPU path with one rank (gradients summed over NCCL: the identity)
    with_nccl = os.environ.get("MORA_DEVICE_NO_NCCL", "0") != "1"
    if with_nccl:
        run([exe, "mora", "--resume", f"{work}/dpo_nccl", "--device", "cuda"], f"{work}/dpo_nccl.log", {"TRAIN_MORA_NCCL": "1"})
    mc, mg = read_jsonl(f"{work}/dpo_cpu/metrics.jsonl"), read_jsonl(f"{work}/dpo_cuda/metrics.jsonl")
    good = [r["step"] for r in mc] == [r["step"] for r in mg] == [1, 2, 3]
    for c, g in zip(mc[1:], mg[1:]):
        # the KL is the k3 estimator, the mean of exp(r) - r - 1 over the tokens' log-ratios r =
        # log p_ref - log p: where the policy has moved far (r of several nats), an error e in a
        # token's log-prob moves that token's term by a relative e, and bf16 log-probs carry
        # errors of a few hundredths of a nat per token.
        # The margin (policy minus reference log-prob of the chosen response, less the same of the
        # rejected one, in nats) sums the log-probs of 4 x response_len tokens, each with such an
        # error, different from token to token: its error is absolute and grows like the square
        # root of those tokens, so a small margin is judged against that, not against 5% of itself.
        margin_nats = 0.03 * math.sqrt(4 * max(c["response_len"], 1.0))
        tol = {"loss": 5e-2 * abs(c["loss"]), "kl": 1e-1 * max(abs(c["kl"]), 1e-3),
               "dpo_margin": max(5e-2 * abs(c["dpo_margin"]), margin_nats), "grad_norm": 5e-2 * abs(c["grad_norm"])}
        ratio = {k: abs(g[k] - c[k]) / max(tol[k], 1e-12) for k in tol}
        step_ok = all(ratio[k] <= 1.0 for k in tol) and all(math.isfinite(g[k]) for k in tol)
        print(f"mora_device dpo step {c['step']}: " + ", ".join(f"{k} cpu {c[k]:.5g} cuda {g[k]:.5g} (tol {tol[k]:.2g})" for k in tol)
              + f"; largest difference {max(ratio.values()):.2f} of its tolerance  {verdict(step_ok)}")
        good = good and step_ok
    ok = ok and good
    if with_nccl:
        mn = read_jsonl(f"{work}/dpo_nccl/metrics.jsonl")
        nccl_ok = "GPU gradients over NCCL" in open(f"{work}/dpo_nccl.log").read() and [r["step"] for r in mn] == [1, 2, 3]
        worst = 0.0
        for n, g in zip(mn[1:], mg[1:]):   # two plain GPU runs differ by float rounding (atomic adds) only
            worst = max([worst] + [abs(n[k] - g[k]) / max(abs(g[k]), 1e-3) for k in ("loss", "kl", "dpo_margin", "grad_norm")])
        nccl_ok = nccl_ok and worst <= 1e-3
        print(f"mora_device dpo through NCCL (one rank) vs plain GPU: largest relative difference {worst:.1e}  {verdict(nccl_ok)}")
        ok = ok and nccl_ok
    else:
        print("SKIP mora_device dpo through NCCL: MORA_DEVICE_NO_NCCL=1")

    # the sampling, in distribution
    for device in ("cpu", "cuda"):
        run([*common, "--steps", "2", "--device", device, "--out", f"{work}/grpo_{device}"], f"{work}/grpo_{device}.log")
    rewards = {}
    for device in ("cpu", "cuda"):
        rows = [r["raw"] for o in read_jsonl(f"{work}/grpo_{device}/pool.jsonl") for r in o["presample"]]
        rewards[device] = rows
    good = len(rewards["cpu"]) == len(rewards["cuda"]) > 0
    for d, name in enumerate(("helpful", "harmless", "truthful")):
        stats = []
        for device in ("cpu", "cuda"):
            x = [r[d] for r in rewards[device]]
            mean = sum(x) / len(x)
            var = sum((v - mean) ** 2 for v in x) / max(len(x) - 1, 1)
            stats.append((mean, var / len(x)))
        se = math.sqrt(stats[0][1] + stats[1][1])
        dim_ok = abs(stats[0][0] - stats[1][0]) <= 4 * se + 1e-9
        print(f"mora_device presample {name}: mean raw reward cpu {stats[0][0]:.4f} cuda {stats[1][0]:.4f} "
              f"(n={len(rewards['cpu'])}, difference {abs(stats[0][0] - stats[1][0]):.4f}, 4 SE {4 * se:.4f})  {verdict(dim_ok)}")
        good = good and dim_ok
    mg = read_jsonl(f"{work}/grpo_cuda/metrics.jsonl")
    step_ok = len(mg) == 2 and all(math.isfinite(r[k]) for r in mg for k in ("loss", "kl", "grad_norm", "reward"))
    step_ok = step_ok and mg[0]["kl"] < 1e-2 and mg[1]["kl"] > mg[0]["kl"]
    print(f"mora_device grpo cuda: step 1 kl {mg[0]['kl']:.2e}, step 2 kl {mg[1]['kl']:.2e}  {verdict(step_ok)}"
          if len(mg) == 2 else f"mora_device grpo cuda: {len(mg)} metrics lines, expected 2  FAIL")
    ok = ok and good and step_ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
