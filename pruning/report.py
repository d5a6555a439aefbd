"""The report of a pipeline run (:func:`pruning.pipeline.train_prune_export`): figures and markdown.

Everything here reads the ``metrics`` dict that ``metrics.json`` holds, so a report can be drawn
again from that file alone: ``write_report(json.load(open("OUT/metrics.json")), Path("OUT"))``.
Figures are PNG files drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anrat.atomic_files import atomic_path, write_text_atomic

FIGURES = {
    "training": "training.png",
    "lambda": "lambda.png",
    "pruning": "pruning.png",
    "layers": "layers.png",
}


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _figure(panels: int) -> tuple[Any, list[Any]]:
    """A matplotlib figure (Agg backend, no display needed) with ``panels`` axes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(3 + 3.5 * panels, 3.8), squeeze=False)
    return fig, list(axes[0])


def _save(fig: Any, path: Path, title: str | None = None) -> None:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # a full disk leaves the earlier figure whole (anrat.atomic_files)
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)


def _axes_style(ax: Any, values: Sequence[float]) -> None:
    """Integer ticks on x (epochs, rounds); a log scale on y only where the values span a decade."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    positive = [v for v in values if v is not None and v > 0]
    if positive and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
        # plain numbers, and only at 1, 2 and 5 times a power of ten
        label = FuncFormatter(
            lambda v, _: f"{v:g}" if round(v / 10 ** math.floor(math.log10(v)), 6) in (1, 2, 5) else ""
        )
        ax.yaxis.set_major_formatter(label)
        ax.yaxis.set_minor_formatter(label)


def _switch(metrics: dict[str, Any]) -> int | None:
    """Epochs trained before the schedule switched to the plain loss for good (the schedule's
    ``switch_epoch``; epoch ``switch + 1`` of metrics.jsonl is the first plain one); None when it
    never switched or trained on the plain loss throughout."""
    history = metrics["training"]["history"]
    switch = history[-1]["switch_epoch"] if history else None
    return None if metrics["config"]["run"]["schedule"]["name"] == "plain" else switch


def plot_training(metrics: dict[str, Any], path: Path) -> None:
    """Training loss and objective, and validation error, per epoch; selected epoch and switch marked."""
    history = metrics["training"]["history"]
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_err) = _figure(2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="training loss (mean cross-entropy)")
    ax_loss.plot(
        epochs, [h["train_objective"] for h in history], "s--", label="training objective (the schedule's criterion)"
    )
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "^-", label="validation loss")
    _axes_style(ax_loss, [h[k] for h in history for k in ("train_loss", "train_objective", "val_loss")])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (nats)")
    ax_err.plot(epochs, [100 * h["val_error"] for h in history], "o-", color="C3", label="validation error")
    best = metrics["training"]["selected"]["best_epoch"]
    if best:
        ax_err.axvline(best, color="grey", linestyle=":", label=f"selected epoch {best}")
    _axes_style(ax_err, [h["val_error"] for h in history])
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("validation error (%)")
    switch = _switch(metrics)
    for ax in (ax_loss, ax_err):
        if switch is not None:
            ax.axvline(
                switch + 0.5, color="k", linestyle="--", linewidth=1, label=f"plain loss from epoch {switch + 1}"
            )
        ax.legend(fontsize=7)
    _save(fig, path, "Training (selected configuration)")


def plot_lambda(metrics: dict[str, Any], path: Path) -> None:
    """lambda against training progress (epochs), sampled within epochs; the deconvexification switch marked."""
    history = metrics["training"]["history"]
    per_epoch = metrics["training"]["steps_per_epoch"]
    schedule = metrics["config"]["run"]["schedule"]["name"]
    fig, (ax,) = _figure(1)
    points = [(step / per_epoch, lam) for h in history for step, lam in h["lam_trace"]]
    points += [(h["epoch"], h["lam"]) for h in history if h["lam"] is not None and h["criterion"] != "plain"]
    points.sort()
    if points:
        ax.plot(*zip(*points), ".-", markersize=3, label="lambda (t = lambda^p)")
    else:
        ax.text(
            0.5,
            0.5,
            f"no lambda: schedule {schedule!r} trains on the plain loss",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    _axes_style(ax, [lam for _, lam in points])
    switch = _switch(metrics)
    if switch is not None:
        ax.axvline(
            switch,
            color="k",
            linestyle="--",
            linewidth=1,
            label=f"deconvexification: plain loss from epoch {switch + 1}",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("lambda")
    ax.set_title(f"Risk-sensitivity index over training (schedule {schedule!r})", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(fig, path)


def plot_pruning(metrics: dict[str, Any], path: Path) -> None:
    """Each round's validation error difference from the unpruned model with the acceptance test's
    upper bound, against the margin, and the nonzero parameters (kept and rolled back rounds)."""
    p = metrics["pruning"]
    tolerance = metrics["config"]["prune"]["tolerance"]
    rounds = [r for r in p["rounds"] if "val_error" in r]
    fig, (ax_err, ax_nz) = _figure(2)
    kept = [r for r in rounds if not r.get("rolled_back")]
    back = [r for r in rounds if r.get("rolled_back")]
    base = p["base_val"]["error"]

    def bounds(rs: list[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
        """Estimated difference (points) and its one-sided bound as an upward error bar."""
        est = [100 * r["acceptance"]["estimate"] if "acceptance" in r else 100 * (r["val_error"] - base) for r in rs]
        up = [100 * r["acceptance"]["upper"] - e if "acceptance" in r else 0.0 for r, e in zip(rs, est)]
        return est, [[0.0] * len(rs), up]

    est, err = bounds(kept)
    ax_err.errorbar(
        [r["round"] for r in kept], est, yerr=err, fmt="o-", capsize=3, label="kept round (bar: 95% upper bound)"
    )
    if back:
        est_b, err_b = bounds(back)
        ax_err.errorbar(
            [r["round"] for r in back],
            est_b,
            yerr=err_b,
            fmt="x",
            color="C3",
            markersize=9,
            capsize=3,
            label="rolled back",
        )
    ax_err.axhline(
        100 * tolerance, color="grey", linestyle="--", linewidth=1, label=f"margin ({100 * tolerance:g} points)"
    )
    ax_err.axhline(0, color="black", linewidth=0.5)
    _axes_style(ax_err, [])
    ax_err.set_xlabel("pruning round")
    ax_err.set_ylabel("validation error - unpruned (points)")
    ax_err.legend(fontsize=7)
    ax_nz.plot(
        [0] + [r["round"] for r in kept],
        [p["params_before"]] + [r["nonzero"] for r in kept],
        "o-",
        label="nonzero parameters",
    )
    ax_nz.plot(
        [0] + [r["round"] for r in kept],
        [p["params_before"]] + [r["params"] for r in kept],
        "s--",
        label="parameters (after unit removal)",
    )
    if back:
        ax_nz.plot(
            [r["round"] for r in back], [r["nonzero"] for r in back], "x", color="C3", markersize=9, label="rolled back"
        )
    _axes_style(ax_nz, [p["params_before"]] + [r["nonzero"] for r in rounds])
    ax_nz.set_xlabel("pruning round (0: unpruned)")
    ax_nz.set_ylabel("weights kept")
    ax_nz.legend(fontsize=7)
    _save(fig, path, "Pruning by significance, round by round")


def plot_layers(metrics: dict[str, Any], path: Path) -> None:
    """Parameters per layer: dense, after unit removal, and nonzero after pruning (log scale)."""
    layers = metrics["pruning"]["layers"]
    names = list(layers)
    xs = np.arange(len(names))
    fig, (ax,) = _figure(1)
    for offset, key, label in (
        (-0.27, "dense", "dense"),
        (0.0, "pruned", "after unit removal"),
        (0.27, "nonzero", "nonzero after pruning"),
    ):
        ax.bar(xs + offset, [max(layers[n][key], 1) for n in names], width=0.27, label=label)
    for x, n in zip(xs, names):
        ax.annotate(
            f"{layers[n]['nonzero'] / layers[n]['dense']:.1%}",
            (x + 0.27, max(layers[n]["nonzero"], 1)),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(xs, names)
    ax.set_yscale("log")
    ax.set_ylabel("parameters (weights and bias)")
    ax.set_title("Weights kept per layer (label: nonzero / dense)", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def _alignment_text(final: dict[str, Any]) -> str:
    """The final alignment of the convolutions' widths (PruneConfig.final_channel_multiple), if any."""
    if final.get("alignment") == "kept":
        removed = ", ".join(f"{name} -{n}" for name, n in final["filters_aligned"].items() if n)
        return f"Convolutions aligned to the width multiple ({removed} filters), kept. "
    if final.get("alignment"):
        return f"Convolutions' alignment to the width multiple {final['alignment']}. "
    return ""


def _int8_lines(int8: dict[str, Any] | None) -> list[str]:
    """The int8 model beside model.onnx (pruning.quantize.write_int8), if one was asked for."""
    if not int8:
        return []
    q, err = int8["quantization"], int8["error"]
    lines = [
        "",
        "### int8",
        "",
        f"onnxruntime static quantisation ({q['quant_format']}; weights {q['weights']}, activations "
        f"{q['activations']}; {q['calibration']} ranges over {q['calibration_inputs']} validation inputs). "
        f"{int8['line']}. Latency: {int8['latency']}, on {int8['cpu']}.",
        "",
        "| | model.onnx (float32) | int8 | float / int8 |",
        "|---|---|---|---|",
        f"| ONNX file (bytes) | {int8['bytes']['float']:,} | {int8['bytes']['int8']:,} | {int8['bytes_ratio']:.2f} |",
    ]
    for split in ("val", "test"):
        if split in err:
            e = err[split]
            lines.append(
                f"| {'validation' if split == 'val' else 'test'} error | {_pct(e['float'])} | {_pct(e['int8'])} | "
                f"{100 * (e['int8'] - e['float']):+.2f} points |"
            )
    for size, t in int8["latency_s"]["float"].items():
        lines.append(
            f"| latency, batch {size} (ms) | {1e3 * t:.3f} | {1e3 * int8['latency_s']['int8'][size]:.3f} | "
            f"{int8['speedup'][size]:.2f}x |"
        )
    if int8["slower_at"]:
        has = int8.get("int8_instructions", "unknown")
        instructions = {
            "VNNI": "it has int8 dot-product instructions (VNNI)",
            "dot-product": "it has int8 dot-product instructions",
            "none": "it has no int8 dot-product instructions (VNNI on x86, dot-product on ARM)",
        }.get(has, "whether it has int8 dot-product instructions is unknown")
        lines += [
            "",
            f"The int8 model ran **slower** than the float one at batch {', '.join(map(str, int8['slower_at']))} "
            f"on this CPU ({instructions}). onnxruntime's int8 kernels gain most on wide layers and on CPUs with "
            "such instructions; in a network this narrow, quantising and dequantising the activations between "
            "layers can cost more than the int8 arithmetic saves. Its size advantage holds everywhere.",
        ]
    return lines


def write_report(metrics: dict[str, Any], out: Path) -> None:
    """Draw the figures and write ``report.md`` from ``metrics`` (what ``metrics.json`` holds)."""
    plot_training(metrics, out / FIGURES["training"])
    plot_lambda(metrics, out / FIGURES["lambda"])
    plot_pruning(metrics, out / FIGURES["pruning"])
    plot_layers(metrics, out / FIGURES["layers"])
    write_text_atomic(out / "report.md", report_markdown(metrics))


def report_markdown(m: dict[str, Any]) -> str:
    cfg, t, p, te, d = m["config"], m["training"], m["pruning"], m["test_error"], m["data"]
    run, sel = cfg["run"], t["selected"]
    cmp = m["export"]["compare"]
    dense, pruned, ratio = cmp["dense"], cmp["pruned"], cmp["ratio_pruned_to_dense"]
    n = te["images"]
    delta = te["pruned"] - te["trained"]
    verdict = "improved" if delta < 0 else "worsened" if delta > 0 else "left unchanged"
    switch = _switch(m)
    lines = [
        f"# MNIST: {run['model']} trained with {run['schedule']['name']!r}, pruned by significance, exported to ONNX",
        "",
        f"Command: `{m['command']}` ("
        + (f"preset `{cfg['preset']}`; " if "preset" in cfg else "")
        + f"resolved options in `config.json`, repeat with "
        f"`{m['program']} --config {Path(cfg['out_dir']) / 'config.json'} --out OTHER`).",
        f"Device: {m['machine']['device']} ({m['machine']['device_name']}, {m['machine']['torch_threads']} torch "
        f"threads); "
        f"torch {m['machine']['torch']}, onnxruntime {m['machine']['onnxruntime']}.",
        f"Data: {d['train']} training, {d['val']} validation, {d['test']} test images.",
        "",
        "## Result",
        "",
        "| | test error | test images misclassified |",
        "|---|---|---|",
        f"| trained (selected on validation) | {_pct(te['trained'])} | {round(te['trained'] * n)} of {n} |",
        f"| pruned and fine-tuned (PyTorch) | {_pct(te['pruned'])} | {round(te['pruned'] * n)} of {n} |",
        *(
            [f"| `model.onnx` under onnxruntime | {_pct(te['onnx'])} | {round(te['onnx'] * n)} of {n} |"]
            if te["onnx"] is not None
            else []
        ),
        "",
        f"Pruning {verdict} the test error ({100 * delta:+.2f} percentage points, {round(delta * n):+d} images "
        f"of {n}). The source paper claims that pruning improves generalisation; one run on {n} images is "
        "weak evidence either way (`benchmarks/mnist_anrat_vs_ce.py` repeats it over seeds).",
        "",
        f"Parameters: {p['params_before']:,} -> {p['params_after']:,} after unit removal, "
        f"{p['nonzero_after']:,} nonzero ({p['nonzero_after'] / p['params_before']:.1%} of the dense network). "
        "Widths: "
        + ", ".join(f"{k} {p['widths_before'][k]} -> {p['widths_after'][k]}" for k in p["widths_before"])
        + ".",
        "",
        "## Training",
        "",
        f"Selected epoch {sel['best_epoch']} of {run['train']['epochs']} (lr {sel['lr']:g}"
        + (")" if run["schedule"]["name"] == "plain" else f", a {sel['a']:g})")
        + f"; validation error {_pct(sel['val'].get('error'))}. "
        + (
            "Schedule 'plain': the plain loss (cross-entropy) throughout."
            if run["schedule"]["name"] == "plain"
            else f"Schedule {run['schedule']['name']!r} from lambda {run['schedule']['lam0']:g}; "
            + (
                f"switched to the plain loss from epoch {switch + 1}."
                if switch is not None
                else "no switch to the plain loss."
            )
        )
        + f" Training took {m['seconds']['train']:.0f} s.",
        "",
    ]
    if len(t["trials"]) > 1:
        lines += [
            "Grid (selected on validation error; only the selected model saw the test set):",
            "",
            "| lr | a | best epoch | validation error |",
            "|---|---|---|---|",
        ]
        for trial in t["trials"]:
            val = "diverged" if "diverged" in trial else _pct((trial["val"] or {}).get("error"))
            lines.append(f"| {trial['lr']:g} | {trial['a']:g} | {trial.get('best_epoch', '-')} | {val} |")
        lines.append("")
    lines += [
        f"![training curves]({FIGURES['training']})",
        "",
        f"![lambda]({FIGURES['lambda']})",
        "",
        "## Pruning",
        "",
        f"Wald tests ({cfg['prune']['estimator']} Fisher on up to {cfg['prune']['max_samples']} training images, "
        f"{cfg['prune']['method']} at alpha {cfg['prune']['alpha']:g}) rank what goes first, at most "
        f"{cfg['prune']['step']:g} of the remaining weights per round; each round recovers for "
        f"{cfg['prune']['fine_tune']['epochs']} epoch(s) and is kept when a one-sided non-inferiority test on the "
        f"validation images' paired outcomes shows it within {100 * cfg['prune']['tolerance']:g} points of the "
        f"unpruned model at level {cfg['prune'].get('acceptance_alpha', 0.05):g} (the margin). "
        f"Validation error {_pct(p['base_val']['error'])} -> {_pct(p['final_val']['error'])}. "
        f"Pruning took {m['seconds']['prune']:.0f} s.",
        "",
    ]
    if p.get("warning"):
        lines += [f"**{p['warning']}**", ""]
    if p.get("acceptance_data"):
        lines += [f"Acceptance images: {p['acceptance_data']}.", ""]
    if p.get("acceptance"):
        a = p["acceptance"]
        lines += [
            f"The delivered model against the unpruned one on the {a['n']:,} validation images: "
            f"{100 * a['estimate']:+.2f} points ({a['worse']} images worse, {a['better']} better), "
            f"{100 * (1 - a['alpha']):.0f}% upper bound {100 * a['upper']:+.2f} points: "
            + ("within" if a["accepted"] else "**not shown to be within**")
            + f" the margin of {100 * a['margin']:g} points.",
            "",
        ]
    blind = [r for r in p["rounds"] if r.get("statistics")]
    if blind:
        lines += [f"In {len(blind)} of {len(p['rounds'])} rounds {blind[0]['statistics']}.", ""]
    lines += [
        "| round | weights zeroed | units removed | significant weights / units | nonzero | parameters | "
        "validation error | difference [upper bound] | step | outcome |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["rounds"]:
        units = ", ".join(f"{k} {v}" for k, v in (r.get("units_removed") or {}).items()) or "-"
        outcome = "rolled back" if r.get("rolled_back") else "kept" if "val_error" in r else "-"
        if r.get("stopped"):
            outcome += f"; stopped: {r['stopped']}"
        significant = f"{r['weights_significant']:,} / {r['units_significant']}" if "weights_significant" in r else "-"
        a = r.get("acceptance")
        diff = f"{100 * a['estimate']:+.2f} [{100 * a['upper']:+.2f}]" if a else "-"
        lines.append(
            f"| {r['round']} | {r['weights_zeroed']:,} | {units} | {significant} | {r.get('nonzero', '-')} | "
            f"{r.get('params', '-')} | {_pct(r.get('val_error'))} | {diff} | {r.get('step', '-')} | {outcome} |"
        )
    final = p.get("final_recovery")
    if final:
        lines += [
            "",
            _alignment_text(final)
            + f"Final recovery: {final['epochs']} epoch(s), validation error {_pct(final.get('val_error'))}"
            + (
                " (undone: the model before it passed the test, the recovered one did not)"
                if final.get("kept") is False
                else ""
            )
            + ".",
        ]
    lines += [
        "",
        f"![pruning rounds]({FIGURES['pruning']})",
        "",
        "| layer | dense | after unit removal | nonzero | kept |",
        "|---|---|---|---|---|",
    ]
    for name, c in p["layers"].items():
        lines.append(
            f"| {name} | {c['dense']:,} | {c['pruned']:,} | {c['nonzero']:,} | {c['nonzero'] / c['dense']:.1%} |"
        )
    lines += [
        "",
        f"![weights kept per layer]({FIGURES['layers']})",
        "",
        "## Deployment: sizes and onnxruntime latency",
        "",
        f"`model.onnx` is the pruned network ({m['export']['model_onnx']['onnx_bytes']:,} bytes, opset "
        f"{m['export']['model_onnx']['opset']}). Checks passed: " + "; ".join(cmp["checks"]) + ". "
        f"Latency: {cmp['latency']}, on {m['machine']['cpus']} CPU(s) shared with whatever else ran.",
        "",
        "| | dense | pruned | pruned / dense |",
        "|---|---|---|---|",
        f"| parameters | {dense['parameters']:,} | {pruned['parameters']:,} | {ratio['parameters']:.3f} |",
        f"| nonzero parameters | {dense['nonzero_parameters']:,} | {pruned['nonzero_parameters']:,} | "
        f"{ratio['nonzero_parameters']:.3f} |",
        f"| ONNX file (bytes) | {dense['onnx_bytes']:,} | {pruned['onnx_bytes']:,} | {ratio['onnx_bytes']:.3f} |",
    ]
    for size in dense["latency_s"]:
        lines.append(
            f"| latency, batch {size} (ms) | {1e3 * dense['latency_s'][size]:.3f} | "
            f"{1e3 * pruned['latency_s'][size]:.3f} | {ratio[f'latency_s@{size}']:.3f} |"
        )
    lines += _int8_lines(m["export"].get("int8"))
    lines += (
        [
            "",
            f"The ONNX model takes images normalised as {d['input_norm']['formula']} (also in its metadata_props), "
            f"shape (N, {', '.join(map(str, d['input_shape']))}), and returns class scores; "
            "`python -m pruning export pruned.pt --include-preprocessing` puts the normalisation into the graph.",
            "",
            "## Cost",
            "",
            "| stage | seconds |",
            "|---|---|",
        ]
        + [f"| {stage} | {secs:.1f} |" for stage, secs in m["seconds"].items()]
        + [""]
    )
    return "\n".join(lines)


__all__ = ["FIGURES", "plot_lambda", "plot_layers", "plot_pruning", "plot_training", "report_markdown", "write_report"]
