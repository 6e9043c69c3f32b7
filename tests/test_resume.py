"""Nothing lost: a run killed mid-stage or mid-save, stopped with Ctrl-C, or restarted by torchrun after losing a rank
ends with the same adapter weights and predictions as an uninterrupted run (bit for bit: CPU, same world size); bad
input fails before any work with a message naming the file and what is wrong."""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

import checkpoint
import cli
import coin
import moelora
import methods
from cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["GQA", "VQAv2"]


def args(mini_data, tiny_base, out, *extra, tasks=TASKS):
    """12 steps a stage (48 records, global batch 4), a mid-stage checkpoint every 3 steps, dropout on (so the
    restored RNG state matters), one torch thread (bit-for-bit needs the same kernels), a large lr (so that 12 steps
    move the random tiny model's answers)."""
    return [f"--data_dir={mini_data}", f"--base={tiny_base}", f"--out={out}", f"--tasks={','.join(tasks)}",
            "--experts=2", "--lora_r=8", "--micro_batch=4", "--save_every=3", "--lr=1e-2", "--max_test=4",
            "--eval_batch=4", "--max_new_tokens=4", "--threads=1", *extra]


def start(argv, log, torchrun=(), ranks=1, script=False):
    """coin.py in a child process (which a test can kill), its output to `log`: the script under torchrun (`torchrun`,
    its arguments), as `python coin.py` (`script`), or else `ranks` processes forked from this one (Ranks)."""
    if not torchrun and not script:
        return Ranks(argv, log, ranks)
    cmd = [sys.executable, *(["-m", "torch.distributed.run", *torchrun] if torchrun else []), "coin.py", *argv]
    with open(log, "w") as f:  # the child keeps its own copy of the file; its own session, to kill it whole
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def free_port():
    with socket.socket() as s:  # a free port for a run's rendezvous
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """A run of `python coin.py ARGV` (or, with ranks > 1, `torchrun --nproc_per_node=RANKS coin.py ARGV`; or another
    entry point's `main`) in processes forked from this one: they start with torch, transformers and coin loaded (a
    fresh interpreter spends seconds importing them), change nothing in this one, and are killed like any process.
    Each rank gets torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...), all ranks one process group (proc.pid),
    to kill them whole; their output goes to `log`. The subset of subprocess.Popen the tests use: pid, poll, wait,
    kill, send_signal. As torchrun does, a rank that fails takes the others down (they would wait in a collective).
    One torch thread each: GNU OpenMP hangs starting threads in a process forked from one that used its threads."""

    def __init__(self, argv, log, ranks=1, main=coin.main):
        assert main is not coin.main or "--threads=1" in argv, "a forked run needs --threads=1"
        open(log, "w").close()
        port, self.pids, self.codes = free_port(), [], {}
        for rank in range(ranks):
            env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} if ranks > 1 else {}
            group = self.pids[0] if self.pids else 0
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, group)
                self._run(main, argv, log, env)  # never returns
            with contextlib.suppress(OSError):  # (the child may have done it first)
                os.setpgid(pid, group or pid)
            self.pids.append(pid)
        self.pid = self.pids[0]

    @staticmethod
    def _run(main, argv, log, env):
        """The forked child: what `python coin.py ARGV` does after its imports (one torch thread, as OMP_NUM_THREADS=1
        gave the child processes), then exit without this process's atexit handlers (pytest's)."""
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
            fd = os.open(log, os.O_WRONLY | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
            os.environ.update(env)
            torch.set_num_threads(1)
            try:
                cli.run(main, argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
            os._exit(code)

    def poll(self):
        for pid in self.pids:
            if pid not in self.codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.codes[pid] = os.waitstatus_to_exitcode(status)
                    if self.codes[pid] and len(self.codes) < len(self.pids):
                        self.kill()
        if len(self.codes) < len(self.pids):
            return None
        return next((c for c in self.codes.values() if c), 0)

    def wait(self, timeout=None):
        """The exit status (the first non-zero one of the ranks); past `timeout` the run is killed (as by
        subprocess.run) and TimeoutExpired raised."""
        t0 = time.time()
        while (code := self.poll()) is None:
            if timeout is not None and time.time() - t0 > timeout:
                self.kill()
                raise subprocess.TimeoutExpired(f"{len(self.pids)} forked rank(s)", timeout)
            time.sleep(0.01)
        return code

    def send_signal(self, sig):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def fail(proc, log, why):
    """Kill the run with all its processes (torchrun's workers too), then fail the test with the log's end."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pytest.fail(f"{why}:\n{open(log).read()[-3000:]}")


def wait_for(path, proc, log, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() - t0 > timeout:
            fail(proc, log, f"no {path} (run ended: {proc.poll() is not None})")
        time.sleep(0.005)


def finish(proc, log, timeout=300):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        fail(proc, log, f"still running after {timeout}s")


def stage(out, j, tasks=TASKS):
    return os.path.join(out, "checkpoints", f"stage{j + 1}-{tasks[j]}")


def assert_killed_mid_stage(out, j, tasks=TASKS):
    """The kill landed where the test meant it to: stage j not finished, its mid-stage checkpoint part-way."""
    assert not os.path.exists(os.path.join(stage(out, j, tasks), "meta.json")), "stage finished before the kill"
    step = torch.load(os.path.join(stage(out, j, tasks), checkpoint.MIDSTAGE), weights_only=True)["step"]
    assert 0 < step < 12, step
    return step


def assert_same_run(out, ref, tasks=TASKS, steps=12):
    """Same adapter + projector weights after every stage, same final loss, same predictions, same results (and
    `steps` steps a stage; None: any number, the same in both)."""
    for j in range(len(tasks)):
        got, want = (load_file(os.path.join(stage(d, j, tasks), "adapter.safetensors")) for d in (out, ref))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), f"stage {j + 1}: {k} differs"
        meta_got, meta_want = (json.load(open(os.path.join(stage(d, j, tasks), "meta.json"))) for d in (out, ref))
        assert meta_got["final_loss"] == meta_want["final_loss"] and meta_got["step"] == meta_want["step"]
        assert steps is None or meta_got["step"] == steps
        assert not os.path.exists(os.path.join(stage(out, j, tasks), checkpoint.MIDSTAGE))
    for stage_name in os.listdir(os.path.join(ref, "predictions")):
        for f in os.listdir(os.path.join(ref, "predictions", stage_name)):
            got, want = (open(os.path.join(d, "predictions", stage_name, f)).read() for d in (out, ref))
            assert got == want, f"{stage_name}/{f} differs"
    got, want = (json.load(open(os.path.join(d, "results.json"))) for d in (out, ref))
    for key in ("matrix", "general_knowledge", "zero_shot", "MAA", "BWT", "inputs", "measured"):
        assert got.get(key) == want.get(key), key


@pytest.fixture(scope="module")
def reference(mini_data, tiny_base, tmp_path_factory):
    """The uninterrupted one-process run the interrupted ones must match."""
    out = str(tmp_path_factory.mktemp("reference") / "run")
    coin.main(args(mini_data, tiny_base, out))
    return out


def test_sigkill_mid_stage_then_resume(mini_data, tiny_base, reference, tmp_path, capsys):
    """SIGKILL during stage 2: the rerun keeps stage 1 (checkpoint, scores) and goes on from stage 2's checkpoint."""
    out, log = str(tmp_path / "run"), str(tmp_path / "log")
    proc = start(args(mini_data, tiny_base, out), log)
    wait_for(os.path.join(stage(out, 1), checkpoint.MIDSTAGE), proc, log)
    proc.kill()
    proc.wait()
    step = assert_killed_mid_stage(out, 1)
    before = json.load(open(os.path.join(out, "results.json")))  # the killed run's, with stage 1's row
    coin.main(args(mini_data, tiny_base, out))
    printed = capsys.readouterr().out
    assert "an earlier run finished 1 of 2 stages" in printed and f"continuing after step {step} of 12" in printed
    assert "stage 1 GQA" not in printed  # neither retrained nor re-scored
    after = json.load(open(os.path.join(out, "results.json")))  # extended, not rewritten:
    assert after["matrix"][0] == before["matrix"][0] and after["timing"]["stage1-GQA"] == before["timing"]["stage1-GQA"]
    assert_same_run(out, reference)


def test_sigkill_mid_save_keeps_the_last_good_checkpoint(mini_data, tiny_base, reference, tmp_path):
    """A FIFO where stage 2's first mid-stage checkpoint is written (midstage.pt.tmp) makes that save block half-way
    (the pipe is full), so the kill lands mid-save every time. The bytes written by then go into a plain file: what
    any kill mid-save leaves. The rerun must never read it, keep stage 1 and redo stage 2 from its start."""
    out, log = str(tmp_path / "run"), str(tmp_path / "log")
    tmp = os.path.join(stage(out, 1), checkpoint.MIDSTAGE + ".tmp")
    os.makedirs(stage(out, 1))
    os.mkfifo(tmp)
    reader = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK)
    proc = start(args(mini_data, tiny_base, out), log)
    written = b""
    while len(written) < 4096:  # the save has begun; the file (~1 MB) is far larger than the pipe (64 kB)
        if proc.poll() is not None:
            fail(proc, log, "the run ended before the save")
        try:
            written += os.read(reader, 1 << 16)
        except BlockingIOError:
            time.sleep(0.005)
    proc.kill()
    proc.wait()
    while chunk := os.read(reader, 1 << 16):  # what was in the pipe when the writer died
        written += chunk
    os.close(reader)
    os.remove(tmp)
    with open(tmp, "wb") as f:
        f.write(written)
    assert 4096 <= len(written) < 200_000
    assert os.path.exists(os.path.join(stage(out, 0), "meta.json"))
    assert not os.path.exists(os.path.join(stage(out, 1), checkpoint.MIDSTAGE))
    coin.main(args(mini_data, tiny_base, out))
    assert_same_run(out, reference)


def test_ctrl_c_saves_and_resume_continues(mini_data, tiny_base, reference, tmp_path):
    """SIGINT during training: the step in flight completes, a mid-stage checkpoint is written, exit code 130 and a
    message saying how to continue (from `python coin.py`); the rerun matches the uninterrupted run."""
    out, log = str(tmp_path / "run"), str(tmp_path / "log")
    proc = start(args(mini_data, tiny_base, out), log, script=True)
    wait_for(os.path.join(stage(out, 0), checkpoint.MIDSTAGE), proc, log)
    proc.send_signal(signal.SIGINT)
    assert finish(proc, log, 60) == 130, open(log).read()[-3000:]
    assert "Run the same command again to continue" in open(log).read()
    assert_killed_mid_stage(out, 0)
    coin.main(args(mini_data, tiny_base, out))
    assert_same_run(out, reference)


def test_torchrun_elastic_restart_after_a_rank_is_killed(mini_data, tiny_base, tmp_path):
    """Two gloo ranks under torchrun --max-restarts=1; rank 1 is SIGKILLed mid-stage; torchrun restarts both, which
    continue from the mid-stage checkpoint and end equal to an uninterrupted two-rank run (of forked ranks: this is
    the suite's one launch of torchrun itself)."""
    argv = lambda out: args(mini_data, tiny_base, out, "--zero_shot=false", tasks=["GQA"])  # noqa: E731
    ref, out, log = str(tmp_path / "ref"), str(tmp_path / "run"), str(tmp_path / "run.log")
    proc = start(argv(ref), str(tmp_path / "ref.log"), ranks=2)
    assert finish(proc, str(tmp_path / "ref.log")) == 0, open(tmp_path / "ref.log").read()[-3000:]
    proc = start(argv(out), log, torchrun=["--nproc_per_node=2", "--max-restarts=1", f"--master_port={free_port()}"])
    wait_for(os.path.join(stage(out, 0, ["GQA"]), checkpoint.MIDSTAGE), proc, log)
    workers = {worker_env(pid)["RANK"]: pid for pid in os.listdir("/proc") if pid.isdigit() and parent(pid) == proc.pid}
    assert sorted(workers) == ["0", "1"], workers
    os.kill(int(workers["1"]), signal.SIGKILL)
    assert finish(proc, log) == 0, open(log).read()[-3000:]
    assert "continuing after step" in open(log).read()
    assert_same_run(out, ref, ["GQA"])


# -----------------------------------------------------------------------------
# The continual-learning methods (methods.py): a kill mid-stage loses nothing, 2 ranks train as 1

METHOD_TASKS = ["GQA", "VQAv2", "ScienceQA"]
METHOD_ARGS = {"sequential": [], "replay": ["--replay_ratio=0.25"], "ewc": ["--ewc_samples=6", "--ewc_lambda=1e4"],
               "lwf": ["--lwf_alpha=1"], "olora": ["--experts=1"]}


def method_args(mini_data, tiny_base, out, method, *extra):
    """Three tasks of 16 records (4 steps a stage at a global batch of 4, 5 with replay), a mid-stage checkpoint every
    step, dropout 0 (each record's masks are the same on any rank: tests/test_ranks.py checks that), lr 1e-3 (at 1e-2 float noise
    between 1 and 2 ranks grows past 1e-4 in three stages, even sequential), each method's term made large enough to
    move the weights well past the tolerance."""
    return args(mini_data, tiny_base, out, f"--method={method}", "--max_train=16", "--save_every=1", "--lr=1e-3",
                "--lora_dropout=0", "--zero_shot=false", *METHOD_ARGS[method], *extra, tasks=METHOD_TASKS)


@pytest.fixture(scope="module")
def sequential(mini_data, tiny_base, tmp_path_factory):
    """The same sequence with plain sequential fine-tuning: each method must end elsewhere."""
    out = str(tmp_path_factory.mktemp("sequential") / "run")
    coin.main(method_args(mini_data, tiny_base, out, "sequential"))
    return out


@pytest.mark.parametrize("method", ["replay", "ewc", "lwf", "olora"])
def test_method_resumes_exactly_and_two_ranks_equal_one(method, mini_data, tiny_base, sequential, tmp_path):
    """Each method's state at a stage's start comes back on resume (the replay sample, EWC's Fisher and anchor, LwF's
    teacher, O-LoRA's earlier subspaces): SIGKILL in stage 3, rerun, the same weights and scores bit for bit as a run
    never stopped. Two gloo ranks of 2 records, and one rank of 2 x 2 accumulation steps, give the weights (and EWC's
    Fisher) of one rank of 4: the cross-entropy and LwF's term are normalised by the global batch's answer tokens, the
    EWC and O-LoRA penalties added once per optimizer step."""
    ref, out, two, accum = (str(tmp_path / name) for name in ("ref", "run", "two", "accum"))
    coin.main(method_args(mini_data, tiny_base, ref, method))
    last, plain = (load_file(os.path.join(stage(d, 2, METHOD_TASKS), "adapter.safetensors")) for d in (ref, sequential))
    assert last.keys() != plain.keys() or max((last[k] - plain[k]).abs().max() for k in last) > 1e-3, "no effect"
    log = str(tmp_path / "log")
    proc = start(method_args(mini_data, tiny_base, out, method), log)
    wait_for(os.path.join(stage(out, 2, METHOD_TASKS), checkpoint.MIDSTAGE), proc, log)
    proc.kill()
    proc.wait()
    assert not os.path.exists(os.path.join(stage(out, 2, METHOD_TASKS), "meta.json")), "stage 3 ended before the kill"
    coin.main(method_args(mini_data, tiny_base, out, method))
    assert_same_run(out, ref, METHOD_TASKS, steps=None)
    files = ["adapter.safetensors"] + ([checkpoint.METHOD_STATE] if method == "ewc" else [])
    for j in range(2):
        for f in files:
            assert load_file(os.path.join(stage(out, j, METHOD_TASKS), f)).keys()  # written, and resumed from

    proc = start(method_args(mini_data, tiny_base, two, method), str(tmp_path / "two.log"), ranks=2)  # the same command
    assert finish(proc, str(tmp_path / "two.log")) == 0, open(tmp_path / "two.log").read()[-3000:]
    assert json.load(open(os.path.join(two, "results.json")))["world_size"] == 2
    coin.main(method_args(mini_data, tiny_base, accum, method, "--micro_batch=2", "--grad_accum=2"))
    for other in (two, accum):
        for j in range(len(METHOD_TASKS)):
            for f in files if j < 2 else ["adapter.safetensors"]:
                got, want = (load_file(os.path.join(stage(d, j, METHOD_TASKS), f)) for d in (other, ref))
                assert got.keys() == want.keys()
                for k in want:
                    # as test_two_gloo_ranks_equal_one_process_and_grad_accum: float noise through Adam's normalisation
                    torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=f"{other} {j + 1} {f}: {k}")
    if method == "ewc":  # the Fisher a resumed run reads is checked against its stage's meta.json
        cfg = coin.parse_config(method_args(mini_data, tiny_base, ref, method))
        model, _ = coin.load_base(cfg, torch.device("cpu"))
        coin.add_adapter(model, cfg, "cpu", methods.METHODS["ewc"](cfg), len(METHOD_TASKS))
        folder = stage(ref, 1, METHOD_TASKS)
        meta = json.load(open(os.path.join(folder, "meta.json")))
        path = os.path.join(folder, checkpoint.METHOD_STATE)
        fisher = load_file(path)
        _, state = checkpoint.load_checkpoint(model, folder, meta)
        assert state.keys() == fisher.keys() and all(torch.equal(v, fisher[k]) for k, v in state.items())
        save_file({k: v * 2 for k, v in fisher.items()}, path)
        with pytest.raises(UserError, match=re.escape(path) + ": its tensors do not match their checksum"):
            checkpoint.load_checkpoint(model, folder, meta)


def test_method_settings_refused():
    with pytest.raises(UserError, match=r"--method=olora --experts=8: O-LoRA trains one plain LoRA per task; give "
                                        r"--experts=1"):
        coin.parse_config(["--method=olora"])
    with pytest.raises(UserError, match=r"--method=lora: must be one of sequential, replay, ewc, lwf, olora"):
        coin.parse_config(["--method=lora"])
    with pytest.raises(UserError, match=r"--multitask --method=ewc: one stage has no earlier task to work on"):
        coin.parse_config(["--method=ewc", "--multitask"])
    with pytest.raises(UserError, match=r"--shard --method=lwf: the method's state .* run it without --shard"):
        coin.parse_config(["--method=lwf", "--shard"])
    coin.parse_config(["--method=replay", "--shard"])  # replay only changes the data: it shards as sequential does


def parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:  # the process has ended
        return None


def worker_env(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(kv.decode().split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


# -----------------------------------------------------------------------------
# Bad input: a clear error before any work, naming the file and what is wrong

@pytest.fixture
def data_copy(mini_data, tmp_path):
    """A copy of CoIN-mini to break (mini_data is shared by the whole session)."""
    out = str(tmp_path / "data")
    shutil.copytree(mini_data, out)
    return out


def task_file(data_dir, task, split):
    return os.path.join(data_dir, "Instructions_Original", task, f"{split}.json")


def test_missing_data_root(tiny_base, tmp_path):
    with pytest.raises(UserError, match=r"--data_dir=\S*nowhere: no such folder"):
        coin.main(args(str(tmp_path / "nowhere"), tiny_base, str(tmp_path / "run")))


@pytest.mark.parametrize("split", ["train", "val"])  # VQAv2 is evaluated on val.json
def test_malformed_json(data_copy, tiny_base, tmp_path, split):
    """Both tasks' train and test files are read first: a broken test file of the last task fails before stage 1."""
    path = task_file(data_copy, "VQAv2", split)
    text = open(path).read()
    with open(path, "w") as f:
        f.write(text[:len(text) // 2])
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match=rf"VQAv2/{split}.json: malformed JSON at line \d+, column \d+"):
        coin.main(args(data_copy, tiny_base, out))
    assert not os.path.exists(out)  # nothing started


def test_missing_image(data_copy, tiny_base, tmp_path):
    rec = json.load(open(task_file(data_copy, "VQAv2", "val")))[3]  # the last of the 4 evaluated
    os.remove(os.path.join(data_copy, "images", rec["image"]))
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"VQAv2/val.json: record 3 \(question_id 'VQAv2_test_3'\): image "
                                         + re.escape(repr(rec["image"])) + r" missing under \S+"):
        coin.main(args(data_copy, tiny_base, out))
    assert not os.path.exists(out)


def test_corrupt_image(data_copy, tiny_base, tmp_path):
    """A corrupt image (its header does not read) is refused before any work, naming the record and the file."""
    rec = json.load(open(task_file(data_copy, "GQA", "train")))[0]
    path = os.path.join(data_copy, "images", rec["image"])
    with open(path, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ValueError, match=r"GQA/train.json: record 0: image " + re.escape(path) + " unreadable"):
        coin.main(args(data_copy, tiny_base, str(tmp_path / "run"), "--zero_shot=false", tasks=["GQA"]))
    assert not os.path.exists(tmp_path / "run")


def test_answer_that_tokenises_to_nothing(data_copy, tiny_base, tmp_path):
    path = task_file(data_copy, "GQA", "train")
    recs = json.load(open(path))
    recs[5]["conversations"][1]["value"] = " "
    with open(path, "w") as f:
        json.dump(recs, f)
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"GQA/train.json: record 5 "
                                         rf"\(id {re.escape(repr(recs[5]['id']))}\): the answer ' ' tokenises to nothing"):
        coin.main(args(data_copy, tiny_base, out))
    assert not os.path.exists(out)


def test_checkpoint_of_another_model(reference, tiny_base, tmp_path):
    path = os.path.join(stage(reference, 0), "adapter.safetensors")
    model = LlavaForConditionalGeneration.from_pretrained(tiny_base)
    moelora.add_moelora(model, None, 16, 32.0, 2, 0.05)  # rank 16; the checkpoint's is 8
    with pytest.raises(ValueError, match=re.escape(path) + r": not a checkpoint of this model .*lora_A: checkpoint "
                                                           r"shape \(8, 128\) != model shape \(16, 128\)"):
        checkpoint.load_checkpoint(model, os.path.dirname(path))
    model = LlavaForConditionalGeneration.from_pretrained(tiny_base)
    moelora.add_moelora(model, ["q_proj"], 8, 32.0, 2, 0.05)  # adapters on q_proj only
    with pytest.raises(ValueError, match=r"not a checkpoint of this model .*0 missing \[\], 36 unexpected"):
        checkpoint.load_checkpoint(model, os.path.dirname(path))
    truncated = str(tmp_path / "adapter.safetensors")
    with open(truncated, "wb") as f:
        f.write(open(path, "rb").read()[:1000])
    with pytest.raises(ValueError, match=re.escape(truncated) + ": unreadable checkpoint"):
        checkpoint.load_checkpoint(model, os.path.dirname(truncated))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(mini_data, tiny_base, tmp_path):
    """lr 1e30: step 1 blows the projector up, step 2's loss is NaN. The run stops naming task and step; the mid-stage
    checkpoint of step 1 stays and no stage checkpoint is written. (A corrupt mid-stage file is an error naming it.)"""
    out = str(tmp_path / "run")
    run = lambda: coin.main(args(mini_data, tiny_base, out, "--zero_shot=false", "--lr=1e30", "--save_every=1",
                                 tasks=["GQA"]))
    midstage = os.path.join(stage(out, 0, ["GQA"]), checkpoint.MIDSTAGE)
    with pytest.raises(FloatingPointError, match=r"train GQA: the loss is nan at step 2 of 12; stopped without saving, "
                                                 r"the last good checkpoint stays \(" + re.escape(midstage)):
        run()
    assert torch.load(midstage, weights_only=True)["step"] == 1
    assert not os.path.exists(os.path.join(stage(out, 0, ["GQA"]), "adapter.safetensors"))
    with open(midstage, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=re.escape(midstage) + ": unreadable mid-stage checkpoint"):
        run()


def test_resume_refuses_what_another_run_wrote(data_copy, tiny_base, tmp_path):
    """Continuing mixes nothing: other settings, another global batch, other data, or --resume=false on a used --out
    are errors naming the file; a finished run re-run changes nothing."""
    out = str(tmp_path / "run")
    run = lambda *extra: coin.main(args(data_copy, tiny_base, out, "--zero_shot=false", *extra, tasks=["GQA"]))
    run()
    adapter = os.path.join(stage(out, 0, ["GQA"]), "adapter.safetensors")
    before = open(adapter, "rb").read(), open(os.path.join(out, "results.json")).read()
    run()  # finished: nothing to do
    assert (open(adapter, "rb").read(), open(os.path.join(out, "results.json")).read()) == before
    with pytest.raises(UserError, match=r"stage1-GQA/meta.json: written by a run with --lr=0.01, this one has "
                                         r"--lr=0.001; continue it with the same settings \(evaluation settings and "
                                         r"more tasks after the finished ones may change\), or write to another --out"):
        run("--lr=1e-3")
    with pytest.raises(UserError, match=r"meta.json: written with a global batch of 4, this run has 8"):
        run("--micro_batch=8")
    with pytest.raises(UserError, match=rf"--out={re.escape(out)} holds a run already"):
        run("--resume=false")
    path = task_file(data_copy, "GQA", "test")  # other test records: the finished stage is scored again
    recs = json.load(open(path))
    recs[0]["answer"] = "regenerated"
    with open(path, "w") as f:
        json.dump(recs, f)
    run()
    assert open(adapter, "rb").read() == before[0]
    assert list(json.load(open(os.path.join(out, "results.json")))["reevaluated"][0]["changed"]) == [
        "test records of GQA"]
    path = task_file(data_copy, "GQA", "train")  # other train records: another training
    recs = json.load(open(path))
    recs[0]["conversations"][1]["value"] = "regenerated"
    with open(path, "w") as f:
        json.dump(recs, f)
    with pytest.raises(UserError, match=r"meta.json: written by a run that read other data or another base"):
        run()


def test_lost_scores_are_scored_again_from_each_stages_checkpoint(reference, mini_data, tiny_base, tmp_path):
    """A finished stage whose scores are gone (a lost results.json) is scored again with its own weights, read from its
    checkpoint, without training: the matrix is the uninterrupted run's."""
    out = str(tmp_path / "run")
    shutil.copytree(reference, out)
    os.remove(os.path.join(out, "results.json"))
    adapters = [open(os.path.join(stage(out, j), "adapter.safetensors"), "rb").read() for j in range(2)]
    coin.main(args(mini_data, tiny_base, out))
    assert json.load(open(os.path.join(out, "results.json")))["matrix"] == \
        json.load(open(os.path.join(reference, "results.json")))["matrix"]
    assert adapters == [open(os.path.join(stage(out, j), "adapter.safetensors"), "rb").read() for j in range(2)]
