"""dev/ncu_summary.py, the per-kernel table of dev/gpu_profile.sh, on a report written here in
Nsight Compute's --print-summary per-kernel layout: totals are launches x mean time (converted
to microseconds), rows sorted by total, shares of the whole."""
import subprocess
import sys

from conftest import ROOT

BLOCK = """  {name}({args}) (8, 1, 1)x(256, 1, 1), Device 0, CC 9.0, Invocations {n}
    Section: Command line profiler metrics
    -------------------------------------------------- ----------- ------- ------- -------
    Metric Name                                        Metric Unit Minimum Maximum Average
    -------------------------------------------------- ----------- ------- ------- -------
    dram__throughput.avg.pct_of_peak_sustained_elapsed           %    0.40    0.48    {dram}
    gpu__time_duration.sum                                      {unit}   1.00   99.00   {mean}
    sm__throughput.avg.pct_of_peak_sustained_elapsed             %    0.30    0.35    {sm}
    -------------------------------------------------- ----------- ------- ------- -------
"""


def run(tmp_path, text):
    path = tmp_path / "ncu.txt"
    path.write_text(text)
    return subprocess.run([sys.executable, str(ROOT / "dev" / "ncu_summary.py"), str(path)], capture_output=True, text=True)


def test_table_totals_order_and_units(tmp_path):
    text = "==PROF== Connected to process 1\n" + "\n".join([
        BLOCK.format(name="small_kernel", args="int", n=10, unit="us", mean="2.00", dram="1.5", sm="2.5"),
        BLOCK.format(name="void big_kernel<64>", args="float *, int", n=3, unit="ms", mean="0.50", dram="80.0", sm="40.0"),
    ])
    p = run(tmp_path, text)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines()[1:3]]
    # big: 3 x 500 us = 1500 us, small: 10 x 2 us = 20 us; shares of 1520 us
    assert rows[0][:6] == ["1500.0", "98.7%", "3", "500.00", "80.0", "40.0"] and rows[0][-1] == "big_kernel<64>"
    assert rows[1][:6] == ["20.0", "1.3%", "10", "2.00", "1.5", "2.5"] and rows[1][-1] == "small_kernel"
    assert p.stdout.splitlines()[-1].split()[:1] == ["1520.0"] and "13 launches" in p.stdout


def test_unfinished_report_is_an_error(tmp_path):
    p = run(tmp_path, "==PROF== Profiling \"k\" - 0 (1/400): 0%....50%....100% - 9 passes\n")
    assert p.returncode != 0 and "no per-kernel summary" in p.stderr
