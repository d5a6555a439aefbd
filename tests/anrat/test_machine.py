"""The one machine description: what runs and benchmarks record about where they ran."""

from __future__ import annotations

import os
import platform

import torch

from anrat.machine import cpu_model, describe_machine, int8_dot_product, machine_line


def test_the_description_names_this_process_hardware_and_versions():
    m = describe_machine("cpu", onnxruntime="9.9")
    assert m["cpus"] == os.cpu_count() and m["torch_threads"] == torch.get_num_threads()
    assert m["torch"] == torch.__version__ and m["python"] == platform.python_version()
    assert m["device"] == "cpu" and "gpu" not in m and m["onnxruntime"] == "9.9"
    assert m["cpu"] == cpu_model() and m["cpu"]


def test_the_cpu_is_named_by_its_model_where_linux_lists_it():
    try:
        listed = [line for line in open("/proc/cpuinfo", encoding="utf-8") if line.lower().startswith("model name")]
    except OSError:
        listed = []
    if listed:
        assert cpu_model() == listed[0].split(":", 1)[1].strip()
    assert int8_dot_product() in {"VNNI", "dot-product", "none", "unknown"}


def test_the_line_holds_what_the_description_holds():
    line = machine_line(onnxruntime="9.9")
    assert cpu_model() in line and f"torch {torch.__version__}" in line and line.endswith("onnxruntime 9.9")
