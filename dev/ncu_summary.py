"""Per-kernel table from an Nsight Compute run with --print-summary per-kernel: total time, share,
launches, mean time, DRAM and SM throughput (% of peak), sorted by total time. Kernel names are
cut at their argument list.

    ncu --print-summary per-kernel --metrics gpu__time_duration.sum,\\
        dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed \\
        PROGRAM ARGS > ncu.txt
    python3 dev/ncu_summary.py ncu.txt
"""
import re
import sys

UNITS = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def kernels(text):
    """(name, launches, mean us, dram %, sm %) for each kernel block of the summary."""
    rows = []
    for block in re.split(r"\n  (?=\S)", text):
        launches = re.search(r"Invocations (\d+)", block)
        time = re.search(r"gpu__time_duration\.sum\s+(\S+)\s+\S+\s+\S+\s+(\S+)", block)
        if not launches or not time:
            continue
        if time.group(1) not in UNITS:
            sys.exit(f"ncu_summary: unknown time unit {time.group(1)!r}")
        dram = re.search(r"dram__throughput\S*\s+%\s+\S+\s+\S+\s+(\S+)", block)
        sm = re.search(r"sm__throughput\S*\s+%\s+\S+\s+\S+\s+(\S+)", block)
        name = block.strip().split("(")[0].strip()
        rows.append((name, int(launches.group(1)), float(time.group(2).replace(",", "")) * UNITS[time.group(1)],
                     float(dram.group(1)) if dram else float("nan"), float(sm.group(1)) if sm else float("nan")))
    return rows


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], errors="replace") as f:
        rows = kernels(f.read())
    if not rows:
        sys.exit(f"ncu_summary: no per-kernel summary in {sys.argv[1]} (did ncu finish?)")
    total = sum(n * t for _, n, t, _, _ in rows)
    print(f"{'total us':>10} {'share':>6} {'launches':>8} {'mean us':>9} {'dram %':>7} {'sm %':>6}  kernel")
    for name, n, t, dram, sm in sorted(rows, key=lambda r: -r[1] * r[2]):
        print(f"{n * t:10.1f} {100 * n * t / total:5.1f}% {n:8d} {t:9.2f} {dram:7.1f} {sm:6.1f}  {name[:70]}")
    print(f"{total:10.1f} total over {sum(r[1] for r in rows)} launches")


if __name__ == "__main__":
    main()
