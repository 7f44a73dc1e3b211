"""Plots of a `train_mora mora` run directory, as PNG files written into it (or --out):

    rewards.png   mean raw reward per dimension over the steps (metrics.jsonl), one panel per
                  dimension, with the KL to the reference below; a second run (--baseline, e.g.
                  the --mora 0 run) is drawn dashed for comparison
    scatter.png   the presampled standardised reward vectors (pool.jsonl), before rewriting (every
                  prompt's original presample) and after (the accepted rewrite's presample in place
                  of its original's), as three pairwise projections; single-reward prompts'
                  points are highlighted
    eval.png      from eval's report.json (the run directory's, or --report; the demo writes its
                  report beside the runs): the baseline's and MORA's mean
                  raw reward per dimension and overall with their standard errors over the
                  prompts, and beside them the paired difference MORA - baseline with its 95%
                  interval

usage: python3 dev/plot_run.py RUN_DIR [--baseline BASELINE_RUN_DIR] [--out DIR] [--stage N] [--report FILE]

Needs matplotlib (pip install matplotlib).
"""
import argparse
import json
import os
import sys

DIMS = ["helpful", "harmless", "truthful"]


def read_jsonl(path):
    rows = []
    with open(path, "rb") as f:
        for n, line in enumerate(f.read().decode("utf-8", "replace").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    sys.exit(f"error: {path}:{n}: not valid JSON ({e.msg})")
    return rows


def plot_rewards(plt, run, baseline, out):
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    if not metrics or "reward_raw" not in metrics[0]:
        print(f"{run}/metrics.jsonl has no per-dimension rewards (a DPO run?): rewards.png skipped")
        return
    base = read_jsonl(os.path.join(baseline, "metrics.jsonl")) if baseline else []
    fig, axes = plt.subplots(2, 3, figsize=(13, 6), sharex=True)
    for k, d in enumerate(DIMS):
        ax = axes[0][k]
        ax.plot([m["step"] for m in metrics], [m["reward_raw"][d] for m in metrics], label=os.path.basename(run.rstrip("/")))
        if base:
            ax.plot([m["step"] for m in base], [m["reward_raw"][d] for m in base], "--", label=os.path.basename(baseline.rstrip("/")))
        ax.set_title(f"{d}: mean raw reward")
        ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot([m["step"] for m in metrics], [m["kl"] for m in metrics])
    if base:
        ax.plot([m["step"] for m in base], [m["kl"] for m in base], "--")
    ax.set_title("KL to the reference (k3)")
    ax = axes[1][1]
    ax.plot([m["step"] for m in metrics], [m["reward"] for m in metrics])
    if base:
        ax.plot([m["step"] for m in base], [m["reward"] for m in base], "--")
    ax.set_title("scalarised reward (standardised)")
    ax = axes[1][2]
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics])
    ax.set_title("loss")
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(out, "rewards.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def plot_scatter(plt, run, out, stage):
    pool = [o for o in read_jsonl(os.path.join(run, "pool.jsonl")) if o.get("stage", 0) == stage]
    if not pool:
        sys.exit(f"error: {run}/pool.jsonl has no prompts of stage {stage}")
    before, after, single_before, single_after = [], [], [], []
    for o in pool:
        pts = [r["z"] for r in o["presample"]]
        (single_before if o["single"] else before).extend(pts)
        acc = None
        if o.get("accepted") is not None:
            acc = next((c for c in o["candidates"] if c["text"] == o["accepted"] and c.get("valid")), None)
        if acc is not None:
            after.extend(r["z"] for r in acc["presample"])
        else:
            (single_after if o["single"] else after).extend(pts)
    pairs = [(0, 1), (0, 2), (1, 2)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    for row, (multi, single, label) in enumerate([(before, single_before, "before rewriting"),
                                                  (after, single_after, "after rewriting")]):
        for k, (i, j) in enumerate(pairs):
            ax = axes[row][k]
            if multi:
                ax.scatter([p[i] for p in multi], [p[j] for p in multi], s=8, alpha=0.5, label="multi-reward prompts")
            if single:
                ax.scatter([p[i] for p in single], [p[j] for p in single], s=8, alpha=0.7, c="tab:red", label="single-reward prompts")
            ax.axhline(0, color="grey", lw=0.5)
            ax.axvline(0, color="grey", lw=0.5)
            ax.set_xlabel(f"z {DIMS[i]}")
            ax.set_ylabel(f"z {DIMS[j]}")
            ax.set_title(label)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "scatter.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def plot_eval(plt, path, out):
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        try:
            rep = json.load(f)
        except json.JSONDecodeError as e:
            sys.exit(f"error: {path}: not valid JSON ({e.msg})")
    if "difference" not in rep:
        print(f"{path} has no standard errors (an older eval): eval.png skipped")
        return
    keys = DIMS + ["overall"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    for k, (who, label) in enumerate((("baseline", "baseline"), ("model", "MORA"))):
        means = [rep[f"{who}_reward"][d] for d in keys]
        errs = [rep[f"{who}_reward_stderr"][d] or 0.0 for d in keys]
        left.bar([i + (k - 0.5) * width for i in range(len(keys))], means, width, yerr=errs, capsize=4, label=label)
    left.set_xticks(range(len(keys)), keys)
    left.axhline(0, color="grey", lw=0.5)
    left.set_title(f"mean raw reward ± standard error ({rep['n_prompts']} prompts x {rep['samples']} samples)", fontsize=10)
    left.legend(fontsize=8)
    diff = [rep["difference"][d] for d in keys]
    for i, x in enumerate(diff):
        lo, hi = x["ci95_low"], x["ci95_high"]
        if lo is not None and hi is not None:
            right.plot([lo, hi], [i, i], color="tab:blue", lw=2)
        right.plot([x["mean"]], [i], "o", color="tab:blue")
    right.axvline(0, color="grey", lw=0.8)
    right.set_yticks(range(len(keys)), keys)
    right.invert_yaxis()
    right.set_title("MORA - baseline: 95% interval, paired by prompt", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "eval.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--baseline", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--report", default="", help="eval's report.json (default: RUN_DIR/report.json, if there)")
    args = ap.parse_args()
    for f in ("metrics.jsonl", "pool.jsonl"):
        if not os.path.exists(os.path.join(args.run, f)):
            sys.exit(f"error: {args.run} has no {f} (not a train_mora mora run directory)")
    if args.report and not os.path.exists(args.report):
        sys.exit(f"error: --report {args.report}: no such file")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: dev/plot_run.py needs matplotlib: pip install matplotlib")
    out = args.out or args.run
    os.makedirs(out, exist_ok=True)
    plot_rewards(plt, args.run, args.baseline, out)
    plot_scatter(plt, args.run, out, args.stage)
    plot_eval(plt, args.report or os.path.join(args.run, "report.json"), out)


if __name__ == "__main__":
    main()
