"""How long the commands that do no work take: `vaetool --version`, `--help`, `info CONFIG`.

Each command runs as a fresh process --repeats times, interleaved with a bare interpreter start
(`python -c pass`, the floor no Python CLI can beat); the medians of wall and CPU time (user +
system, from os.wait4) are printed with the issue's target (0.3 s) and the time above the bare
interpreter. The console script is the one `pip install` put next to this Python.

    python bench/bench_startup.py                 # 7 repeats (~15 s)
    python bench/bench_startup.py --repeats 2     # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.3


def commands() -> dict[str, list[str]]:
    """Name -> argv of each measured command (the installed console script, else `python -m vaetool`)."""
    script = shutil.which("vaetool", path=str(Path(sys.executable).parent)) or shutil.which("vaetool")
    cli = [script] if script else [sys.executable, "-m", "vaetool"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "vaetool --version": [*cli, "--version"],
        "vaetool --help": [*cli, "--help"],
        "vaetool info sd1": [*cli, "info", "sd1"],
        "vaetool info configs/flux.yaml": [*cli, "info", str(ROOT / "configs" / "flux.yaml")],
        "vaetool encode --help": [*cli, "encode", "--help"],
    }


def run_once(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run of argv (output discarded; a failure stops the bench)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ | {"COLUMNS": "100"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.read().decode(errors='replace')[-300:]}")
    proc.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    """Measure every command, print a table (and JSON rows with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="Write the rows here too.")
    args = parser.parse_args()
    cmds = commands()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
    for _ in range(args.repeats):  # interleaved: a load spike hits every command alike
        for name, argv in cmds.items():
            times[name].append(run_once(argv))
    floor = statistics.median(w for w, _ in times["python -c pass"])
    rows = []
    print(f"{'command':34s} {'wall s':>7s} {'cpu s':>6s} {'above python':>12s}  target {TARGET_S} s")
    for name, samples in times.items():
        wall, cpu = statistics.median(w for w, _ in samples), statistics.median(c for _, c in samples)
        verdict = "" if name.startswith("python") else ("met" if wall <= TARGET_S else "missed")
        print(f"{name:34s} {wall:7.3f} {cpu:6.3f} {wall - floor:12.3f}  {verdict}")
        rows.append({"command": name, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "above_python_s": round(wall - floor, 4)})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
