"""The two orientations of a vmapped linear layer on the CPU, side by side.

Under ``torch.func.vmap`` a linear layer of K members becomes ``torch.bmm(x, W^T)``: for each
member an (N, in) x (in, out) product. :class:`anrat.batched.NarrowLinearLayout` computes layers
with at most 10 outputs as ``(W @ x^T)^T`` instead. This script times both orientations for the
shapes of the toolkit's studies (the function-fitting MLPs with 80 members, lenet5's
fully-connected layers with 9) and prints the ratio; the threshold of 10 comes from this table.

    python benchmarks/batched_linear_layout.py [--repeats 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# (members K, rows N, in_features, out_features)
SHAPES = [
    (80, 1000, 4, 4),  # teacher: hidden layer
    (80, 1000, 4, 1),  # teacher: output layer
    (80, 200, 1, 8),  # wave
    (80, 200, 8, 1),
    (80, 64, 6, 6),  # parity
    (80, 64, 6, 1),
    (80, 1000, 32, 32),
    (80, 1000, 16, 16),
    (9, 64, 800, 500),  # lenet5 fc1, batch 64
    (9, 64, 500, 10),  # lenet5 fc2
]


def seconds_per_call(fn, repeats: int) -> float:
    """Median over 5 blocks of ``repeats`` calls, after a warm-up, in seconds per call."""
    for _ in range(5):
        fn()
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        blocks.append((time.perf_counter() - start) / repeats)
    return statistics.median(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s); microseconds per call (median of 5 blocks)")
    print(f"{'K':>3} {'N':>5} {'in':>4} {'out':>4} {'bmm(x, W^T)':>12} {'(W @ x^T)^T':>12} {'ratio':>6}")
    for k, n, fan_in, fan_out in SHAPES:
        x, w = torch.randn(k, n, fan_in), torch.randn(k, fan_out, fan_in)
        plain = seconds_per_call(lambda x=x, w=w: torch.bmm(x, w.transpose(1, 2)), args.repeats)
        other = seconds_per_call(lambda x=x, w=w: torch.bmm(w, x.transpose(1, 2)).transpose(1, 2), args.repeats)
        print(f"{k:>3} {n:>5} {fan_in:>4} {fan_out:>4} {plain * 1e6:>12.0f} {other * 1e6:>12.0f} {plain / other:>6.2f}")


if __name__ == "__main__":
    main()
