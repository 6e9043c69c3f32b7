"""The numerics pins (pins.py): a pinned run computes what an AVX2-only CPU would, bit for bit; unpinned, the
libraries' wider kernels give other bits; a run resumes only under the pins it was written with."""
import json
import os
import subprocess
import sys

import pytest

import checkpoint
import cli
import pins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_run(mini_data, tiny_base, out, **env):
    """Start three optimizer steps and a 4-record evaluation of the tiny model in a fresh process (the pins act only
    before torch loads); returns a function that waits for it and returns the stage's checksum and results.json's
    record of the numerics."""
    clean = {k: v for k, v in os.environ.items() if k not in pins.PINS and k != pins.OPT_OUT}
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "coin.py", f"--data_dir={mini_data}", f"--base={tiny_base}",
                                 f"--out={out}", "--tasks=GQA", "--max_train=24", "--max_test=4", "--eval_batch=4",
                                 "--zero_shot=false"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**clean, "TOKENIZERS_PARALLELISM": "false", **env})

    def result():
        assert proc.wait() == 0, open(f"{out}.log").read()[-3000:]
        meta = json.load(open(os.path.join(out, "checkpoints", "stage1-GQA", "meta.json")))
        return meta["checksum"], json.load(open(os.path.join(out, "results.json")))["numerics"]
    return result


@pytest.fixture(scope="module")
def runs(mini_data, tiny_base, tmp_path_factory):
    """The toy run pinned and pinned with MKL capped at AVX2 as on an Intel CPU without AVX-512 (ATen and oneDNN are
    capped by the pins already), both at once (one thread each, on both cores); then unpinned (two threads)."""
    root = tmp_path_factory.mktemp("pins")
    pinned, mkl_avx2 = (toy_run(mini_data, tiny_base, root / name, **env) for name, env in
                        [("pinned", {}), ("mkl_avx2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"})])
    runs = {"pinned": pinned(), "mkl_avx2": mkl_avx2()}
    return {**runs, "unpinned": toy_run(mini_data, tiny_base, root / "unpinned", COIN_PINS="0")()}


def test_pinned_run_is_what_an_avx2_cpu_computes(runs):
    checksum, numerics = runs["pinned"]
    # the pins took effect: torch at AVX2, MKL on its CNR branch for every x86-64 CPU, oneDNN off, one thread
    assert (numerics["pinned"], numerics["torch_cpu_capability"], numerics["onednn"], numerics["threads"]) == \
        (True, "AVX2", False, 1), numerics
    assert numerics["mkl_cbwr"] in ("COMPATIBLE", None), numerics  # None: a torch build without MKL
    # MKL capped at AVX2 computes the same bits
    assert runs["mkl_avx2"][0] == checksum


def test_unpinned_run_differs(runs):
    checksum, _ = runs["pinned"]
    other, numerics = runs["unpinned"]
    assert not numerics["pinned"] and numerics["onednn"], numerics
    if numerics["torch_cpu_capability"] == "AVX2" and numerics["mkl_cbwr"] is None:
        pytest.skip("this CPU offers torch nothing beyond AVX2 and torch has no MKL: unpinned is pinned here")
    # AVX-512 in torch's kernels, or MKL's own dispatch (AVX2 with FMA or wider) instead of its SSE2 branch
    assert other != checksum, numerics


def test_resume_needs_the_same_pins():
    info = {"config": {}, "global_batch": 8, "inputs": "h", "numerics": {"pins": {"MKL_CBWR": "COMPATIBLE"}}}
    checkpoint.check_same_run(dict(info), info, "meta.json", {})
    old = {k: v for k, v in info.items() if k != "numerics"}  # written before the pins were recorded: resumes
    checkpoint.check_same_run(old, info, "meta.json", {})
    with pytest.raises(cli.UserError, match="numerics pins"):
        checkpoint.check_same_run({**info, "numerics": {"pins": {"MKL_CBWR": None}}}, info, "meta.json", {})
