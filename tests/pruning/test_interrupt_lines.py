"""What an interrupted `python -m pruning` says, at each place it can be stopped: which of its files
are whole and which were not written (the interrupt is raised where the signal would land)."""

from __future__ import annotations

import signal

import pytest
import torch

import pruning.__main__ as prune_cli
import pruning.pipeline as pipeline
from anrat.interrupts import Interrupted
from tests.test_refusals import mlp_checkpoint, write_idx_folder


def sigterm(*args, **kwargs):
    raise Interrupted(signal.SIGTERM)


@pytest.fixture
def inputs(tmp_path):
    return mlp_checkpoint(tmp_path / "model.pt"), write_idx_folder(tmp_path / "idx", train=120, test=40)


def test_export_stopped_while_writing_keeps_the_earlier_file(inputs, tmp_path, monkeypatch, run_cli):
    checkpoint, data = inputs
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the earlier file")
    monkeypatch.setattr(prune_cli, "export_onnx", sigterm)
    code, io = run_cli(prune_cli.main, ["export", str(checkpoint), "--out", str(out), "--data-dir", str(data)])
    assert code == 143 and len(io.err.strip().splitlines()) == 1, io.err
    assert f"interrupted by SIGTERM while writing {out}; {out} is the earlier file or none" in io.err
    assert out.read_bytes() == b"the earlier file"


@pytest.mark.slow  # exports and prepares the int8 quantisation
def test_export_stopped_in_the_int8_copy_says_the_float_file_was_written(inputs, tmp_path, monkeypatch, run_cli):
    checkpoint, data = inputs
    out, val = tmp_path / "m.onnx", tmp_path / "val.pt"
    torch.save({"x": torch.rand(40, 1, 28, 28), "y": torch.randint(0, 10, (40,))}, val)
    monkeypatch.setattr(prune_cli, "write_int8", sigterm)
    argv = ["export", str(checkpoint), "--out", str(out), "--val-data", str(val), "--quantize", "int8"]
    argv += ["--calibration-images", "16"]
    code, io = run_cli(prune_cli.main, argv)
    assert code == 143, io.err
    assert f"{out} was written, {tmp_path / 'm.int8.onnx'} was not" in io.err.strip().splitlines()[-1]
    assert out.stat().st_size > 0 and not (tmp_path / "m.int8.onnx").exists()


def test_pruning_stopped_while_writing_its_files_says_each_is_whole(inputs, tmp_path, monkeypatch, run_cli):
    checkpoint, data = inputs
    out = tmp_path / "pruned"
    monkeypatch.setattr(pipeline, "compare_models", sigterm)
    argv = ["prune", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--val-size", "40", "--out", str(out)]
    argv += ["--max-rounds", "1", "--quiet"]
    code, io = run_cli(prune_cli.main, argv)
    last = io.err.strip().splitlines()[-1]
    assert code == 143, io.err
    assert "interrupted by SIGTERM while writing the pruned model's files" in last
    assert f"every file in {out} is whole" in last and "run the same command again" in last
    assert not list(out.glob(".*.tmp")) and not (out / "model.onnx").exists()
