"""bench/llava7b.py at toy shapes on the CPU: the same code path as at 7B (meta-device build, coin's adapter, FSDP2
sharding, to_empty, training steps, FLOP count, generation), so the GPU script cannot break unnoticed."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_llava7b_bench_at_tiny_shapes(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, "bench/llava7b.py", "--shapes=tiny", "--adapters=moelora", "--dropout=0.05",
                           "--grad_ckpt=1", "--shard=0,1", "--micro_batches=1,2", "--steps=1", "--gen_batches=2",
                           "--new_tokens=3", f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out)]
    for shard in (False, True):
        train = {r["micro_batch"]: r for r in rows if r["shard"] is shard and "micro_batch" in r}
        assert sorted(train) == [1, 2]
        assert [train[b]["tokens"] for b in (1, 2)] == [24, 48]  # the tiny shapes' 24-token sequence
        assert train[2]["tflop_per_step"] == 2 * train[1]["tflop_per_step"] > 0  # counted once, times the batch
        assert all(r["step_s"] > 0 and 0 < r["mfu"] < 1 for r in train.values())
        generated = [r for r in rows if r["shard"] is shard and "gen_batch" in r]
        assert [(r["gen_batch"], r["new_tokens"]) for r in generated] == [(2, 3)]
    assert "shard True" in proc.stdout and "MFU" in proc.stdout


def test_methods_bench_runs(tmp_path):
    """bench/methods.py, one round: every method's row and the Fisher's cost are printed."""
    proc = subprocess.run([sys.executable, "bench/methods.py", "--rounds=1", "--threads=1", "--fisher_records=2",
                           "--tasks_before=1"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("sequential", "replay", "ewc", "lwf", "olora"):
        assert f"| {method} | " in proc.stdout, proc.stdout
    assert "EWC's Fisher, once per task: 2 records" in proc.stdout


def test_moelora_bench_at_tiny_shapes():
    """bench/moelora.py, two rounds at a toy shape: every variant's row and every target's verdict are printed (the
    verdicts themselves are about timings: not asserted); a bad setting is one error line."""
    proc = subprocess.run([sys.executable, "bench/moelora.py", "--shapes=64x96", "--tokens=8", "--r=8", "--rounds=2",
                           "--threads=1", "--dropout=0.05"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("base linear alone", "LoRA r=8 (moelora.py, E=1)", "MoELoRA E=8 r=8 (moelora.py)",
                "per-expert loop E=8 r=8", "MoE / LoRA time", "MoE / LoRA saved activations"):
        assert row in proc.stdout, proc.stdout
    bad = subprocess.run([sys.executable, "bench/moelora.py", "--shapes=64", "--dropout=1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --dropout=1.0: must be in [0, 1)"), bad.stderr
