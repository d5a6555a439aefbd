"""onnxruntime batch-1 latency of LeNet-5 by layer widths: which pruned shapes run fast.

Untrained LeNet-5s of the given widths (conv1, conv2, fc1) are exported to ONNX and timed in
alternation against the unpruned (20, 50, 500) with :func:`pruning.export.paired_latency`; the
speed-up depends on the shapes only, not on the weights. Prints each shape's speed-up, per repeat
of the whole timing.

    python benchmarks/lenet5_width_latency.py --repeats 400 --rounds 2

With ``--user-cnn`` the shapes are (conv1, conv2, hidden) of issue 11's raw-pixel CNN
(``benchmarks/user_cnn.py``, unpruned (16, 32, 128)) instead, timed on one onnxruntime thread:

    python benchmarks/lenet5_width_latency.py --user-cnn --threads 1 --widths 16,16,16 8,16,16 8,8,16 4,8,16

With ``--runs OUT ...`` it times instead the dense and pruned ONNX files that the main job wrote
(``OUT/onnx/dense.onnx`` and ``OUT/onnx/pruned.onnx``), each pair in alternation: a steadier
reading than the report's own 20 calls.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from anrat.models import lenet5
from pruning.export import export_onnx, paired_latency

sys.path.insert(0, str(Path(__file__).resolve().parent))
from user_cnn import build  # noqa: E402  (issue 11's CNN, beside this script)

WIDTHS = [(20, 50, 500), (10, 18, 130), (10, 17, 123), (10, 16, 128), (8, 16, 128), (10, 20, 130), (9, 17, 123)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=400, help="alternating calls per model")
    ap.add_argument("--rounds", type=int, default=2, help="times the whole timing is repeated")
    ap.add_argument("--runs", nargs="*", default=[], help="main-job output folders whose ONNX pair to time")
    ap.add_argument(
        "--widths", nargs="*", default=[], metavar="C1,C2,F1", help="shapes to time instead of the built-in list"
    )
    ap.add_argument("--user-cnn", action="store_true", help="time shapes of benchmarks/user_cnn.py, not LeNet-5")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    args = ap.parse_args()
    try:
        shapes = [tuple(int(w) for w in text.split(",")) for text in args.widths]
    except ValueError:
        ap.error(f"--widths takes comma-separated integers such as 10,16,128, got {args.widths}")
    if any(len(s) != 3 or min(s) < 1 for s in shapes):
        ap.error(f"--widths takes three positive widths (conv1, conv2, fc1) per shape, got {args.widths}")
    dense_shape = (16, 32, 128) if args.user_cnn else WIDTHS[0]
    if args.user_cnn and not shapes:
        ap.error("--user-cnn needs --widths")
    widths_list = [dense_shape, *shapes] if shapes else WIDTHS
    for run in args.runs:
        pair = {name: Path(run) / "onnx" / f"{name}.onnx" for name in ("dense", "pruned")}
        speedups = []
        for _ in range(args.rounds):
            times = paired_latency(pair, 1, repeats=args.repeats, warmup=20, threads=args.threads)
            speedups.append(times["dense"] / times["pruned"])
        print(f"{run}: batch-1 speed-up " + ", ".join(f"{s:.2f}x" for s in speedups), flush=True)
    if args.runs:
        return
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for widths in widths_list:
            paths[widths] = Path(folder) / f"{'_'.join(map(str, widths))}.onnx"
            model = build((widths[0], widths[1]), widths[2]) if args.user_cnn else lenet5(*widths)
            export_onnx(model.eval(), paths[widths], torch.randn(2, 1, 28, 28))
        for _ in range(args.rounds):
            times = paired_latency(paths, 1, repeats=args.repeats, warmup=20, threads=args.threads)
            dense = times[widths_list[0]]
            print("  ".join(f"{w}: {dense / t:.2f}x" for w, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
