"""
What the numerics pins (pins.py) hold and what they cost, on the CPU at hand. Two parts:

    python bench/pins.py check --data_dir=data/coin-mini   # ~4 min on 2 cores: the same short run in 7 environments
    python bench/pins.py cost --data_dir=data/coin-mini    # ~6 min: a short run and a step, pinned and not

check: the same short coin.py run (ScienceQA then TextVQA, 200 train and 40 test records each, one thread) under each
environment below, each into its own folder, then a table of each run's stage checksums (a sha256 of the adapter and
projector, checkpoints/*/meta.json) and its accuracy matrix. The pinned runs add the restrictions an AVX2-only CPU
would impose (MKL_ENABLE_INSTRUCTIONS=AVX2 caps MKL's dispatch on Intel CPUs; ATen and oneDNN are held at AVX2
already) and must all agree: a CPU with more than AVX2 computes what an AVX2-only one does. The unpinned runs show
what each library changes when left to pick its kernels.

cost: CPU seconds (user + system, steadier than wall time on a shared machine) of a short coin.py run (ScienceQA, 800
train and 40 test records, one thread), pinned and unpinned (COIN_PINS=0) alternately, --runs times each; then
`python bench/train_step.py --only=tiny --threads=1 --dropout=0 --clock=cpu` in subprocesses, pinned (pins.apply(),
oneDNN off, as coin.py runs) and unpinned alternately, --rounds times each. Prints the pinned/unpinned ratio of each
alternation's times: median and range.
"""
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pins  # noqa: E402

# what a CPU with AVX2 and nothing wider lets each library use
AVX2_CPU = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# name: (environment added to what coin.py pins by itself, expected to equal the pinned run?)
RUNS = {
    "pinned": ({}, True),
    "unpinned (COIN_PINS=0): every library at its widest": ({"COIN_PINS": "0"}, False),
    "pinned + MKL_ENABLE_INSTRUCTIONS=AVX2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, True),
    "unpinned, as an AVX2-only CPU (all three capped at AVX2)": ({"COIN_PINS": "0", **AVX2_CPU}, False),
    "pinned but ATEN_CPU_CAPABILITY=avx512": ({"ATEN_CPU_CAPABILITY": "avx512"}, False),
    "pinned but ATEN_CPU_CAPABILITY=default": ({"ATEN_CPU_CAPABILITY": "default"}, False),
    "pinned but MKL_CBWR='' (MKL's own dispatch)": ({"MKL_CBWR": ""}, False),
}
SHORT = ["--tasks=ScienceQA,TextVQA", "--max_train=200", "--max_test=40"]


def env_for(extra):
    env = {k: v for k, v in os.environ.items() if k not in pins.PINS and k != pins.OPT_OUT}
    return {**env, "TOKENIZERS_PARALLELISM": "false", **extra}


def stages(out):
    """Each stage's checksum (its first 12 hex digits) and the last stage's final training loss."""
    ck = os.path.join(out, "checkpoints")
    metas = [json.load(open(os.path.join(ck, d, "meta.json"))) for d in sorted(os.listdir(ck))]
    return [m["checksum"][:12] for m in metas], metas[-1]["final_loss"]


def check(opts, rest):
    rows = []
    for i, (name, (extra, _)) in enumerate(RUNS.items()):
        out = os.path.join(opts["out"], f"run{i}")
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time: a finished one would be skipped
        args = [sys.executable, "coin.py", f"--data_dir={opts['data_dir']}", *SHORT, "--threads=1", f"--out={out}",
                *rest]
        t = time.perf_counter()
        proc = subprocess.run(args, cwd=ROOT, env=env_for(extra), capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(f"{name}: coin.py failed\n{proc.stderr[-2000:]}")
        res = json.load(open(os.path.join(out, "results.json")))
        rows.append((name, *stages(out), res["matrix"], res["numerics"], wall))
        print(f"{name}: {wall:.0f} s, stages {' '.join(rows[-1][1])}", flush=True)
    ref = rows[0]
    print("\n| environment | torch | MKL | oneDNN | stage checksums | last loss | matrix | same as pinned (expected) |")
    print("|---|---|---|---|---|---|---|---|")
    bad = []
    for (name, sums, loss, matrix, num, _), (_, expect) in zip(rows, RUNS.values()):
        same = sums == ref[1] and matrix == ref[3]
        cells = "; ".join(" ".join(f"{v:.1f}" for v in row if v is not None) for row in matrix)
        print(f"| {name} | {num['torch_cpu_capability']} | {num['mkl_cbwr']} | {'on' if num['onednn'] else 'off'} | "
              f"{' '.join(sums)} | {loss!r} | {cells} | {'yes' if same else 'no'} ({'yes' if expect else 'no'}) |")
        if expect and not same:
            bad.append(name)
    print(f"\nwall time: pinned {rows[0][-1]:.0f} s, unpinned {rows[1][-1]:.0f} s")
    if bad:
        sys.exit(f"differ from the pinned run although they should not: {bad}")


PINNED_CHILD = ("import pins, runpy, sys; pins.apply(); import torch; torch.backends.mkldnn.enabled = False; "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def step_ms(pinned, opts):
    args = ["bench/train_step.py", "--only=tiny", "--threads=1", "--dropout=0", f"--rounds={opts['inner_rounds']}",
            "--clock=cpu"]
    cmd = [sys.executable, "-c", PINNED_CHILD, *args] if pinned else [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for({} if pinned else {"COIN_PINS": "0"}), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"bench/train_step.py failed\n{proc.stderr[-2000:]}")
    # the table's rows "| tiny | 1.9M | LoRA E=1 | 1216 | 186 | ...": adapter -> step ms
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| tiny")]
    assert rows, proc.stdout
    return {cells[2]: float(cells[4]) for cells in rows}


def short_run(pinned, opts, out):
    """One short coin.py run (ScienceQA, 800 train and 40 test records, one thread): its CPU seconds (user + system,
    interpreter start included) and its training stage's wall seconds (results.json's timing)."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "coin.py", f"--data_dir={opts['data_dir']}", "--tasks=ScienceQA", "--max_train=800",
                    "--max_test=40", "--threads=1", "--zero_shot=false", f"--out={out}"], cwd=ROOT,
                   env=env_for({} if pinned else {"COIN_PINS": "0"}), check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    train = json.load(open(os.path.join(out, "results.json")))["timing"]["stage1-ScienceQA"]["train"]
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, train


def ratio_line(what, pinned, unpinned):
    rs = [a / b for a, b in zip(pinned, unpinned)]
    return (f"{what}: pinned {statistics.median(pinned):.1f}, unpinned {statistics.median(unpinned):.1f}; pinned / "
            f"unpinned median {statistics.median(rs):.2f} (range {min(rs):.2f}-{max(rs):.2f}, {len(rs)} alternations)")


def cost(opts):
    runs = {True: [], False: []}
    for r in range(opts["runs"]):
        for p in ([True, False] if r % 2 == 0 else [False, True]):
            runs[p].append(short_run(p, opts, os.path.join(opts["out"], "cost")))
        print(f"short run {r + 1}: pinned {runs[True][-1]}, unpinned {runs[False][-1]} (CPU s, train s)", flush=True)
    for i, what in enumerate(["short coin.py run, CPU seconds", "its training stage, wall seconds"]):
        print(ratio_line(what, [t[i] for t in runs[True]], [t[i] for t in runs[False]]))
    steps = {True: [], False: []}
    for r in range(opts["rounds"]):
        order = [True, False] if r % 2 == 0 else [False, True]
        got = {p: step_ms(p, opts) for p in order}
        for p in order:
            steps[p].append(got[p])
        print(f"round {r + 1}: pinned {got[True]}  unpinned {got[False]}", flush=True)
    for row in steps[True][0] if steps[True] else []:
        print(ratio_line(f"tiny step, {row}, ms", [t[row] for t in steps[True]], [t[row] for t in steps[False]]))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("check", "cost"):
        sys.exit("usage: python bench/pins.py check|cost [--key=value ...] (see the docstring)")
    known = {"out": "out/pins-check", "data_dir": "data/coin-mini", "rounds": 5, "inner_rounds": 3, "runs": 3}
    opts, rest = {}, []
    for a in sys.argv[2:]:
        key = a[2:].split("=", 1)[0]
        if key in known:
            opts[key] = type(known[key])(a.split("=", 1)[1])
        else:
            rest.append(a)  # passed on to coin.py (check)
    if what == "cost" and rest:
        sys.exit(f"unknown settings {rest}; cost takes --{', --'.join(known)}")
    opts = {**known, **opts}
    # coin.py runs in ROOT
    opts["out"], opts["data_dir"] = os.path.abspath(opts["out"]), os.path.abspath(opts["data_dir"])
    check(opts, rest) if what == "check" else cost(opts)
