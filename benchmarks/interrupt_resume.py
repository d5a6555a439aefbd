"""Ctrl-C and SIGTERM at random moments of a training, then the same command: does it resume bit for bit?

Issue 27's target: of N interruptions (SIGINT or SIGTERM drawn at random, sent at a random moment
after the first checkpoint), every one ends with exactly one line on stderr and status 130 or 143,
leaves no temporary file, and the same command then ends with weights bit-identical to an
uninterrupted run's (the baseline, run once first).

    python benchmarks/interrupt_resume.py --data-dir ../shared/data/mnist --runs 20

The training is ``python -m anrat.train`` on an MLP (16 hidden units, 3,000 training images, 150
epochs, about 8 s on 2 cores), small enough that a run lasts seconds and an interrupt can land
anywhere: in a step, in the validation pass, while a checkpoint is written. A draw later than the
run's end would interrupt nothing; ``--max-delay`` (5 s) stays below it. The draws come from ``--seed``; each run's
signal, delay, status, line and verdict are printed and written to ``OUT/runs.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from anrat.checkpoint import load_checkpoint
from anrat.machine import machine_line

STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


def command(data_dir: str, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "anrat.train", "--data-dir", data_dir, "--out", str(out), "--model", "mlp",
        "--hidden", "16", "--train-subset", "3000", "--val-size", "500", "--test-subset", "1000",
        "--epochs", "150", "--no-progress",
    ]  # fmt: skip


def selected_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "model.pt")["state_dict"]


def one_interruption(data_dir: str, out: Path, signum: int, delay: float) -> dict:
    proc = subprocess.Popen(command(data_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    record = {
        "signal": signal.Signals(signum).name,
        "delay_s": delay,
        "status": proc.returncode,
        "lines": lines,
        "temporaries_left": [p.name for p in out.glob(".*.tmp")],
    }
    held = load_checkpoint(out / "last.pt") if (out / "last.pt").exists() else {}
    record["held"] = {"epoch": held.get("epoch"), "steps_of_next_epoch": held.get("in_epoch", {}).get("steps")}
    resumed = subprocess.run(command(data_dir, out), capture_output=True, text=True)
    record["resume_status"] = resumed.returncode
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--runs", type=int, default=20, help="interruptions")
    ap.add_argument("--seed", type=int, default=0, help="seed of the signals and moments drawn")
    ap.add_argument("--max-delay", type=float, default=5.0, help="latest moment, seconds after the first checkpoint")
    ap.add_argument("--out", default="runs/bench_interrupt_resume", help="output folder")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    baseline_dir = out / "uninterrupted"
    if not (baseline_dir / "model.pt").exists():
        subprocess.run(command(args.data_dir, baseline_dir), check=True, capture_output=True)
    baseline = selected_weights(baseline_dir)
    rng = random.Random(args.seed)
    records = []
    for k in range(args.runs):
        signum = rng.choice([signal.SIGINT, signal.SIGTERM])
        delay = rng.uniform(0.0, args.max_delay)
        run_dir = out / f"run{k}"
        if run_dir.exists():
            for p in sorted(run_dir.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
        record = one_interruption(args.data_dir, run_dir, signum, delay)
        if record["resume_status"] == 0:
            resumed = selected_weights(run_dir)
            record["bit_identical"] = resumed.keys() == baseline.keys() and all(
                torch.equal(resumed[n], baseline[n]) for n in resumed
            )
        else:
            record["bit_identical"] = False
        record["ok"] = (
            record["status"] == STATUS[signum]
            and len(record["lines"]) == 1
            and "Traceback" not in "\n".join(record["lines"])
            and not record["temporaries_left"]
            and record["bit_identical"]
        )
        records.append(record)
        line = record["lines"][0] if record["lines"] else "(no line)"
        print(f"run {k}: {record['signal']} after {delay:.2f} s -> status {record['status']}; {line}; "
              f"resumed bit-identical: {record['bit_identical']}", flush=True)  # fmt: skip
    (out / "runs.json").write_text(json.dumps(records, indent=1))
    ok = sum(r["ok"] for r in records)
    mid_epoch = sum(r["held"]["steps_of_next_epoch"] is not None for r in records)
    print(
        f"\n{ok} of {len(records)} interruptions: one line, status 130/143, no temporary left, resumed bit-identical "
        f"(the uninterrupted run is the baseline); {mid_epoch} of them stopped within an epoch, after the step"
    )


if __name__ == "__main__":
    main()
