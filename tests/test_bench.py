"""bench/llava7b.py at toy shapes on the CPU: the same code path as at 7B (meta-device build, coin's adapter, FSDP2
sharding, to_empty, training steps, FLOP count, generation), so the GPU script cannot break unnoticed."""
import importlib.util
import json
import os
import sys

import pytest
import torch

import cli
from test_resume import Ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench(name, monkeypatch):
    """bench/<name>.py's module, loaded in this process. What loading it changes is undone after the test: its
    OMP_WAIT_POLICY default, the folders it puts on sys.path."""
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def run_bench(name, argv, capsys, monkeypatch):
    """bench/<name>.py as its command line runs it, in this process (no interpreter start, torch loaded already):
    (exit status, stdout, stderr). Its torch threads are set back after it."""
    module = load_bench(name, monkeypatch)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as e:
            cli.run(module.main, argv)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_llava7b_bench_at_tiny_shapes(tmp_path, monkeypatch):
    """In a process forked from this one (the bench starts a process group and FSDP2 shards its model there)."""
    out, log = tmp_path / "bench.jsonl", str(tmp_path / "log")
    proc = Ranks(["--shapes=tiny", "--adapters=moelora", "--dropout=0.05", "--grad_ckpt=1", "--shard=0,1",
                  "--micro_batches=1,2", "--steps=1", "--gen_batches=2", "--new_tokens=3", f"--out={out}"], log,
                 main=load_bench("llava7b", monkeypatch).main)
    assert proc.wait(timeout=300) == 0, open(log).read()[-3000:]
    rows = [json.loads(line) for line in open(out)]
    for shard in (False, True):
        train = {r["micro_batch"]: r for r in rows if r["shard"] is shard and "micro_batch" in r}
        assert sorted(train) == [1, 2]
        assert [train[b]["tokens"] for b in (1, 2)] == [24, 48]  # the tiny shapes' 24-token sequence
        assert train[2]["tflop_per_step"] == 2 * train[1]["tflop_per_step"] > 0  # counted once, times the batch
        assert all(r["step_s"] > 0 and 0 < r["mfu"] < 1 for r in train.values())
        generated = [r for r in rows if r["shard"] is shard and "gen_batch" in r]
        assert [(r["gen_batch"], r["new_tokens"]) for r in generated] == [(2, 3)]
    printed = open(log).read()
    assert "shard True" in printed and "MFU" in printed


def test_methods_bench_runs(capsys, monkeypatch):
    """bench/methods.py, one round: every method's row and the Fisher's cost are printed."""
    status, out, err = run_bench("methods", ["--rounds=1", "--threads=1", "--fisher_records=2", "--tasks_before=1"],
                                 capsys, monkeypatch)
    assert status == 0, err[-3000:]
    for method in ("sequential", "replay", "ewc", "lwf", "olora"):
        assert f"| {method} | " in out, out
    assert "EWC's Fisher, once per task: 2 records" in out


def test_moelora_bench_at_tiny_shapes(capsys, monkeypatch):
    """bench/moelora.py, two rounds at a toy shape: every variant's row and every target's verdict are printed (the
    verdicts themselves are about timings: not asserted); a bad setting is one error line."""
    status, out, err = run_bench("moelora", ["--shapes=64x96", "--tokens=8", "--r=8", "--rounds=2", "--threads=1",
                                             "--dropout=0.05"], capsys, monkeypatch)
    assert status == 0, err[-3000:]
    for row in ("base linear alone", "LoRA r=8 (moelora.py, E=1)", "MoELoRA E=8 r=8 (moelora.py)",
                "per-expert loop E=8 r=8", "MoE / LoRA time", "MoE / LoRA saved activations"):
        assert row in out, out
    status, _, err = run_bench("moelora", ["--shapes=64", "--dropout=1"], capsys, monkeypatch)
    assert status == 2 and err.startswith("error: --dropout=1.0: must be in [0, 1)"), err
