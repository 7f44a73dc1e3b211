"""Plots of a train_mora run directory, as PNG files written into it (or --out).

Of a `train_mora mora` run:

    rewards.png   mean raw reward per dimension over the steps (metrics.jsonl), one panel per
                  dimension, with the KL to the reference below; a second run (--baseline, e.g.
                  the --mora 0 run) is drawn dashed for comparison
    scatter.png   the presampled standardised reward vectors (pool.jsonl), before rewriting (every
                  prompt's original presample) and after (the accepted rewrite's fresh presample,
                  --after_K, or in a run without one the presample that selected it, in place of
                  its original's), as three pairwise projections; single-reward prompts' points
                  are highlighted
    eval.png      from eval's report.json (the run directory's, or --report; the demo writes its
                  report beside the runs): the --baseline's and the --model's mean raw reward
                  per dimension and overall with their standard errors over the prompts, and
                  beside them the paired difference model - baseline with its 95% interval; the
                  bars are labelled as the report's rows (e.g. "MORA (runs/mora)", "baseline
                  (runs/baseline)", a checkpoint's path), the title names the heads, and a
                  dimension whose head is untrained (the report's "untrained") has no bars

Of a `train_mora pretrain` or `train_mora sft` run:
    loss.png      the training loss over the steps (metrics.jsonl) with the validation loss where
                  the run measured it, the learning rate and the gradient norm; a second run
                  (--baseline) is drawn dashed

usage: python3 dev/plot_run.py RUN_DIR [--baseline BASELINE_RUN_DIR] [--out DIR] [--stage N] [--report FILE]

RUN_DIR and --baseline are run directories of the same kind (mora, or pretrain and sft). Input that is not what it should be
(a missing or other directory, a file that is not JSON or not eval's report) is named in one
line and the exit status is 1, before any plotting. Needs matplotlib (pip install matplotlib).
"""
import argparse
import json
import os
import sys

DIMS = ["helpful", "harmless", "truthful"]


def fail(message):
    sys.exit(f"error: {message}")


def read_jsonl(path):
    rows = []
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        fail(f"{path}: {e.strerror}")
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                fail(f"{path}:{n}: not valid JSON ({e.msg})")
            if not isinstance(rows[-1], dict):
                fail(f"{path}:{n}: not a JSON object")
    return rows


def run_command(path):
    """The command a run directory's config.json names ("pretrain", "sft", "mora", ...), or None."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg.get("command") if isinstance(cfg, dict) else None


def check_run(path, flag, want=None):
    """The kind of run directory path is: "mora" (metrics.jsonl and pool.jsonl) or "train" (a
    pretrain or sft run's metrics.jsonl); or exit naming what it is not. want: the kind it must be."""
    name = f"{flag} {path}" if flag else path
    if not os.path.exists(path):
        fail(f"{name}: no such directory")
    if not os.path.isdir(path):
        fail(f"{name}: not a directory (a train_mora mora, pretrain or sft run directory is expected)")
    kind = "train" if run_command(path) in ("pretrain", "sft") else "mora"
    if want is not None and kind != want:
        fail(f"{name} is a {'pretrain or sft' if kind == 'train' else 'mora'} run directory, the run compared with it "
             f"a {'pretrain or sft' if want == 'train' else 'mora'} one")
    for f in ("metrics.jsonl", "pool.jsonl") if kind == "mora" else ("metrics.jsonl",):
        if not os.path.isfile(os.path.join(path, f)):
            fail(f"{name} has no {f} (not a train_mora {'mora' if kind == 'mora' else 'pretrain or sft'} run directory)")
    return kind


def plot_loss(plt, run, baseline, out):
    runs = [(run, read_jsonl(os.path.join(run, "metrics.jsonl")), "-")]
    if baseline:
        runs.append((baseline, read_jsonl(os.path.join(baseline, "metrics.jsonl")), "--"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for path, metrics, style in runs:
        name = os.path.basename(path.rstrip("/"))
        steps = [m["step"] for m in metrics]
        axes[0].plot(steps, [m["loss"] for m in metrics], style, label=f"{name}: train")
        val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
        if val:
            axes[0].plot([v[0] for v in val], [v[1] for v in val], style, marker="o", label=f"{name}: validation")
        axes[1].plot(steps, [m["lr"] for m in metrics], style, label=name)
        axes[2].plot(steps, [m["grad_norm"] for m in metrics], style, label=name)
    for ax, title in zip(axes, ("loss", "learning rate", "gradient norm (before clipping)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "loss.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def read_report(path):
    """eval's report.json, or exit naming what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            rep = json.load(f)
    except OSError as e:
        fail(f"--report {path}: {e.strerror}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"--report {path}: not valid JSON ({getattr(e, 'msg', e)})")
    if not isinstance(rep, dict) or not isinstance(rep.get("model_reward"), dict):
        fail(f'--report {path} is not an eval report.json (no "model_reward")')
    return rep


def has_rewards(metrics):
    return bool(metrics) and all(isinstance(m.get("reward_raw"), dict) for m in metrics)


def plot_rewards(plt, run, baseline, out):
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    if not has_rewards(metrics):
        print(f"{run}/metrics.jsonl has no per-dimension rewards (a DPO run?): rewards.png skipped")
        return
    base = read_jsonl(os.path.join(baseline, "metrics.jsonl")) if baseline else []
    if baseline and not has_rewards(base):
        print(f"--baseline {baseline}/metrics.jsonl has no per-dimension rewards (a DPO run?): rewards.png without it")
        base = []
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


def pool_stages(run):
    return list({json.dumps(o.get("stage", 0)): o.get("stage", 0) for o in read_jsonl(os.path.join(run, "pool.jsonl"))}.values())


def plot_scatter(plt, run, out, stage):
    pool = [o for o in read_jsonl(os.path.join(run, "pool.jsonl")) if o.get("stage", 0) == stage]
    before, after, single_before, single_after = [], [], [], []
    for o in pool:
        pts = [r["z"] for r in o["presample"]]
        (single_before if o["single"] else before).extend(pts)
        acc = None
        if o.get("accepted") is not None and isinstance(o.get("after"), dict):
            # the accepted rewrite's fresh presample and its own verdict
            acc = o["after"]
            (single_after if acc.get("single") else after).extend(r["z"] for r in acc["presample"])
            continue
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


def row_label(rep, who):
    """The report's row label; an older report has none: the path with the flag it came from."""
    label = rep.get(f"{who}_label")
    return label if isinstance(label, str) and label else f"--{who} {rep.get(who, '?')}"


def plot_eval(plt, rep, path, out):
    if "difference" not in rep:
        print(f"{path} has no standard errors (an older eval): eval.png skipped")
        return
    untrained = set(rep.get("untrained") or [])
    keys = DIMS + ["overall"]
    # an untrained head scores every response 0: no bars; "overall" is over the other dimensions
    shown = [d not in untrained and rep["model_reward"].get(d) is not None for d in keys]
    names = [d if ok else f"{d}\n(untrained)" for d, ok in zip(keys, shown)]
    if untrained and shown[-1]:
        names[-1] = "overall\n(" + ", ".join(d for d in DIMS if d not in untrained) + ")"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    labels = {who: row_label(rep, who) for who in ("baseline", "model")}
    for k, who in enumerate(("baseline", "model")):
        xs = [i + (k - 0.5) * width for i in range(len(keys)) if shown[i]]
        means = [rep[f"{who}_reward"][d] for d, ok in zip(keys, shown) if ok]
        errs = [rep[f"{who}_reward_stderr"].get(d) or 0.0 for d, ok in zip(keys, shown) if ok]
        left.bar(xs, means, width, yerr=errs, capsize=4, label=labels[who])
    left.set_xticks(range(len(keys)), names)
    left.axhline(0, color="grey", lw=0.5)
    left.set_title(f"mean raw reward ± standard error ({rep['n_prompts']} prompts x {rep['samples']} samples)", fontsize=10)
    left.legend(fontsize=8)
    for i, d in enumerate(keys):
        x = rep["difference"].get(d)
        if not shown[i] or not isinstance(x, dict):
            continue
        lo, hi = x["ci95_low"], x["ci95_high"]
        if lo is not None and hi is not None:
            right.plot([lo, hi], [i, i], color="tab:blue", lw=2)
        right.plot([x["mean"]], [i], "o", color="tab:blue")
    right.axvline(0, color="grey", lw=0.8)
    right.set_yticks(range(len(keys)), names)
    right.invert_yaxis()
    right.set_title("model - baseline: 95% interval, paired by prompt", fontsize=10)
    title = f"{labels['model']} vs {labels['baseline']}"
    if rep.get("heads"):
        title += f"\nheads {rep['heads']}"
        if rep.get("heads_fingerprint"):
            title += f" ({rep['heads_fingerprint']})"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "eval.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def import_pyplot(out=""):
    """matplotlib's pyplot (Agg), once --out is known to be usable."""
    if out and os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out}: not a directory")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: dev/plot_run.py needs matplotlib: pip install matplotlib")
    return plt


def make_out(out):
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: {e.strerror}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--baseline", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--report", default="", help="eval's report.json (default: RUN_DIR/report.json, if there)")
    args = ap.parse_args()
    # every input is checked before matplotlib is needed: a mistake is one line naming it
    kind = check_run(args.run, "")
    if args.baseline:
        check_run(args.baseline, "--baseline", kind)
    for path in (args.run, args.baseline):
        if path:
            for m in read_jsonl(os.path.join(path, "metrics.jsonl")):
                if kind == "train" and not all(isinstance(m.get(k), (int, float)) for k in ("step", "loss", "lr", "grad_norm")):
                    fail(f"{path}/metrics.jsonl: a line without a number for step, loss, lr or grad_norm")
    if kind == "train":
        for flag, value in (("--stage", args.stage != 0), ("--report", args.report)):
            if value:
                fail(f"{flag} is for a mora run; {args.run} is {'an sft' if run_command(args.run) == 'sft' else 'a pretrain'} run")
        plt = import_pyplot(args.out)
        out = make_out(args.out or args.run)
        plot_loss(plt, args.run, args.baseline, out)
        return
    stages = pool_stages(args.run)
    if not all(type(s) is int for s in stages):
        fail(f'{args.run}/pool.jsonl has a "stage" that is not an integer')
    stages.sort()
    if args.stage not in stages:
        have = "no prompts" if not stages else f"stage {stages[0]} only" if len(stages) == 1 else \
            f"stages {', '.join(map(str, stages))}"
        fail(f"--stage {args.stage}: {args.run}/pool.jsonl has {have}")
    if args.report and not os.path.isfile(args.report):
        fail(f"--report {args.report}: no such file")
    report = args.report or os.path.join(args.run, "report.json")
    rep = read_report(report) if os.path.isfile(report) else None
    plt = import_pyplot(args.out)
    out = make_out(args.out or args.run)
    try:
        plot_rewards(plt, args.run, args.baseline, out)
        plot_scatter(plt, args.run, out, args.stage)
        if rep is not None:
            plot_eval(plt, rep, report, out)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        # a file of the right kind with content it should not have (edited, or of another version)
        fail(f"unexpected content in {args.run}, {args.baseline or 'no baseline'} or {report}: "
             f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
