"""What a figure was measured on: the one description of the machine every run and benchmark records.

Speed figures depend on the instruction set as much as on the core count (onnxruntime's int8 above
all), so the CPU is named by its model (``/proc/cpuinfo`` on Linux), not by ``platform.processor()``,
which is only the architecture on Linux.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def int8_dot_product() -> str:
    """Whether this CPU has int8 dot-product instructions, as /proc/cpuinfo lists them (Linux):
    ``"VNNI"`` (x86), ``"dot-product"`` (ARM ``asimddp``), ``"none"``, or ``"unknown"``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = {word for line in f if line.lower().startswith(("flags", "features")) for word in line.split()}
    except OSError:
        return "unknown"
    if flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8"}:
        return "VNNI"
    if "asimddp" in flags:
        return "dot-product"
    return "none" if flags else "unknown"


def describe_machine(device: torch.device | str | None = None, **versions: str) -> dict[str, Any]:
    """The hardware and versions of this process: CPU model and count, torch's threads, torch and
    Python versions, and with a CUDA ``device`` the GPU's name; ``versions`` adds others
    (``onnxruntime=ort.__version__``)."""
    machine: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **versions,
    }
    if device is not None:
        device = torch.device(device)
        machine["device"] = str(device)
        if device.type == "cuda":
            machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def machine_line(device: torch.device | str | None = None, **versions: str) -> str:
    """:func:`describe_machine` in one line, for the head of a benchmark's printout."""
    m = describe_machine(device, **versions)
    parts = [m["cpu"], f"{m['cpus']} CPUs", f"{m['torch_threads']} torch threads"]
    if "gpu" in m:
        parts.insert(0, m["gpu"])
    parts += [f"torch {m['torch']}", f"Python {m['python']}", *(f"{k} {v}" for k, v in versions.items())]
    return ", ".join(parts)
