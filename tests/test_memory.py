"""bench/memory.py: its fake-tensor peaks against the same code on real tensors under the same tracker (toy shapes),
its stand-in for moelora's sparse dropout against the real layer, and the dropout masks that real runs draw."""
import hashlib
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import cli  # noqa: E402
import memory  # noqa: E402
import moelora  # noqa: E402
from test_resume import Ranks  # noqa: E402

TOLERANCE = 0.01  # fake over real peak, at toy shapes (measured: within 0.9%)


def bench(tmp_path, *settings):
    """The rows of `python bench/memory.py --tensors=real` and of `--tensors=fake`, both run at once in processes
    forked from this one (the bench changes process state: its environment, a fake process group)."""
    procs = {tensors: Ranks(["--shapes=tiny", f"--tensors={tensors}", "--grid=lists", "--seq=40", "--prompt=30",
                             f"--out={tmp_path / f'{tensors}.jsonl'}", *settings], str(tmp_path / f"{tensors}.log"),
                            main=memory.main) for tensors in ("real", "fake")}
    for tensors, proc in procs.items():
        assert proc.wait(timeout=300) == 0, open(tmp_path / f"{tensors}.log").read()[-3000:]
    return [[json.loads(line) for line in open(tmp_path / f"{tensors}.jsonl")] for tensors in procs]


@pytest.mark.parametrize("settings", [
    ("--only=train,eval", "--dropout=0,0.05", "--grad_ckpt=1,0", "--micro_batches=1,4", "--eval_batches=2",
     "--new_tokens=8"),
    ("--only=train", "--adapters=lora,moelora", "--ranks=8", "--micro_batches=2"),
])
def test_fake_peaks_match_real_tensors(tmp_path, settings):
    """The same step, on fake and on real tensors: every peak within TOLERANCE, sharded over 8 fake ranks too; with
    dropout, fake runs SizedExpertDropout and real runs moelora's ExpertDropoutLinear."""
    real, fake = bench(tmp_path, *settings)
    assert len(real) == len(fake) > 0
    for r, f in zip(real, fake):
        config = {k: v for k, v in r.items() if k in ("adapter", "dropout", "grad_ckpt", "ranks", "micro_batch",
                                                      "eval_batch")}
        assert config == {k: f[k] for k in config}
        assert abs(f["total"] / r["total"] - 1) < TOLERANCE, (config, r, f)
        assert f["weights"] == r["weights"] and f["optimizer"] == r["optimizer"], (config, r, f)


@pytest.mark.parametrize("d_in", [64, 512])  # the two branches of the sparse layout (few or many drops a row)
def test_sized_dropout_allocates_as_the_real_layer(d_in):
    """One MoELoRA linear with dropout, forward and backward under the tracker: SizedExpertDropout on fake tensors
    peaks within 1% of ExpertDropoutLinear on real ones (the count of drops is random, its expectation in the first)."""
    def peak(fake):
        torch.manual_seed(0)
        with torch.device("meta"):
            layer = moelora.MoELoRALinear(torch.nn.Linear(d_in, 256, bias=False), 16, 32.0, 8, 0.05)
        mode = memory.tensor_mode("fake" if fake else "real")
        with mode, memory.sized_dropout(fake):
            layer.to_empty(device="cpu")
            x = torch.randn(2, 48, d_in, requires_grad=True)  # (B, T, d_in): earlier layers need the input's gradient
            tracker = memory.Tracker()
            tracker.track_external(layer, x)
            with tracker, moelora.dropout_records([0, 1]):  # two records, a seed each
                layer.train()(x).sum().backward()
            return tracker.get_tracker_snapshot("peak")
    real, fake = (memory.columns(peak(fake))["total"] for fake in (False, True))
    assert abs(fake / real - 1) < 0.01, (real, fake)


def digest(t):
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


# (seed, entries, p, drops, their positions' digest, the packed gaps' digest, gaps over 255), from moelora.draw_drops
# as it was before drop_chunk: a record's masks in real runs, pinned
DRAWS = [(1, 10000, 0.05, 479, "7695698208e47a2e", "7b030ee57cdc84fb", 0),
         (1099511627783, 300000, 0.05, 15136, "38bb9b575bf39ec6", "6879376a9522a874", 0),
         (3, 50000, 0.3, 15005, "9e24d912ab2156da", "4c28b9bba5015e9f", 0),
         (4, 100000, 0.01, 1030, "7e86059746370fa0", "f23bbe88e2cb0252", 75)]


@pytest.mark.parametrize("seed,total,p,count,positions,packed,large", DRAWS)
def test_dropout_draw_is_unchanged(seed, total, p, count, positions, packed, large):
    """Same seed, same drops: the bench's sizing (moelora.drop_chunk) left the masks of real runs as they were."""
    drops = moelora.draw_drops(seed, total, p)
    small, large_at, _ = moelora.pack_drops(drops)
    assert (len(drops), digest(drops), digest(small), len(large_at)) == (count, positions, packed, large)


def test_bad_setting_is_one_error_line(capsys):
    """As `python bench/memory.py --grid=all --adapters=dora` runs it (refused before any work: in this process)."""
    with pytest.raises(SystemExit) as e:
        cli.run(memory.main, ["--grid=all", "--adapters=dora"])
    stderr = capsys.readouterr().err
    assert e.value.code == 2 and stderr.startswith("error: --grid=all"), stderr
    assert len(stderr.splitlines()) == 2 and "--adapters=dora" in stderr
