"""The batched trainer against one training loop per run, on the function-fitting study (issue 13).

Runs ``python -m anrat.recipes.function_fit`` twice, as separate processes and one after the other,
with the same seeds, steps, problems and methods: ``--engine loop`` (the reference: one training
loop per run, ``--workers`` processes) and ``--engine batched`` (the runs of each problem as one
vectorised model, :mod:`anrat.batched`). Measured side by side in one run:

- wall-clock seconds of each command (including its start-up), and the ratio loop / batched:
  with ``--repeats R`` the two commands alternate R times, and the medians and ranges are given;
- the per-run success table: for every (problem, method, seed), success (final training MSE below
  the problem's threshold) and divergence under each engine, and how many differ;
- the final errors: per run, |batched - loop| / loop, median and largest.

    python benchmarks/batched.py --seeds 20 --steps 2000 --repeats 3      # the study's defaults

The records go to ``OUT/loop`` and ``OUT/batched`` (the recipe's ``results.json``) and the
comparison to ``OUT/comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from anrat.atomic_files import write_text_atomic
from anrat.machine import describe_machine


def run_engine(engine: str, args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], float]:
    """One run of the study with ``engine``; its results.json and the command's wall-clock seconds."""
    command = [
        sys.executable,
        "-m",
        "anrat.recipes.function_fit",
        "--engine",
        engine,
        "--seeds",
        str(args.seeds),
        "--steps",
        str(args.steps),
        "--out",
        str(out / engine),
        "--workers",
        str(args.workers),
        "--no-progress",
    ]
    if args.problems:
        command += ["--problems", args.problems]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads((out / engine / "results.json").read_text()), seconds


def compare(loop: dict[str, Any], batched: dict[str, Any]) -> dict[str, Any]:
    """Per-run agreement of the two engines' records (same problems, methods and seeds)."""

    def key(r: dict[str, Any]) -> tuple[str, str, int]:
        return r["problem"], r["method"], r["seed"]

    by_key = {key(r): r for r in batched["runs"]}
    differ, relative = [], []
    for ref in loop["runs"]:
        other = by_key[key(ref)]
        if (ref["success"], ref["diverged"]) != (other["success"], other["diverged"]):
            differ.append({"run": list(key(ref)), "loop": ref["final_error"], "batched": other["final_error"]})
        if ref["final_error"] is not None and other["final_error"] is not None and ref["final_error"] > 0:
            relative.append(abs(other["final_error"] - ref["final_error"]) / ref["final_error"])
    successes = {
        engine: {f"{p}/{m}": s["successes"] for p, methods in record["summary"].items() for m, s in methods.items()}
        for engine, record in (("loop", loop), ("batched", batched))
    }
    return {
        "runs": len(loop["runs"]),
        "success_or_divergence_differs": differ,
        "successes": successes,
        "final_error_relative_difference": {
            "median": statistics.median(relative) if relative else None,
            "max": max(relative) if relative else None,
        },
    }


def spread(values: list[float], unit: str) -> str:
    """``median [min, max]`` of ``values``."""
    return f"{statistics.median(values):.2f}{unit} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="seeds per problem and method (the study's default: 20)")
    ap.add_argument("--steps", type=int, default=2000, help="full-batch steps per run (the study's default: 2000)")
    ap.add_argument("--problems", default=None, help="comma-separated problems (default: all)")
    ap.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="worker processes of both engines (the recipe's default: one per core, at most 2)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of the two commands, for the timings")
    ap.add_argument("--out", default="runs/bench_batched", help="output folder")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, list[float]] = {"loop": [], "batched": []}
    for _ in range(args.repeats):  # alternating, so that drift of the machine affects both alike
        loop, loop_seconds = run_engine("loop", args, out)
        batched, batched_seconds = run_engine("batched", args, out)
        seconds["loop"].append(loop_seconds)
        seconds["batched"].append(batched_seconds)
    comparison = compare(loop, batched)
    ratios = [a / b for a, b in zip(seconds["loop"], seconds["batched"])]
    record = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": describe_machine(),
        "seconds": seconds,
        "speedup": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "each": ratios},
        **comparison,
    }
    write_text_atomic(out / "comparison.json", json.dumps(record, indent=1))
    rel = comparison["final_error_relative_difference"]
    print(f"{comparison['runs']} runs ({args.seeds} seeds x {args.steps} steps); {os.cpu_count()} CPUs")

    print(
        f"wall-clock, median [min, max] of {args.repeats}: loop {spread(seconds['loop'], ' s')} "
        f"({args.workers} workers), batched {spread(seconds['batched'], ' s')}; loop / batched {spread(ratios, 'x')}"
    )

    print(f"runs whose success or divergence differs: {len(comparison['success_or_divergence_differs'])}")
    print(f"final errors, |batched - loop| / loop: median {rel['median']:.2e}, max {rel['max']:.2e}")
    print(
        "successes (loop / batched): "
        + "; ".join(
            f"{k} {v} / {comparison['successes']['batched'][k]}" for k, v in comparison["successes"]["loop"].items()
        )
    )


if __name__ == "__main__":
    main()
