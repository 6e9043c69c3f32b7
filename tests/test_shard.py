"""--shard (FSDP2) on two gloo CPU ranks trains and evaluates as the unsharded two-rank run does, and a stage stopped
part-way continues across it: sharded -> unsharded and unsharded -> sharded, to the same weights, predictions and
scores, bit for bit. The runs are set as at 7B: a bf16 base (the adapter and projector fp32, so a block gathers mixed
dtypes) and gradient checkpointing (a block's forward runs again in backward, gathered again), with gradient
accumulation and a short last batch (coin.fsdp_fillers). Gradient clipping is off (--max_grad_norm=1e9): a sharded
gradient's norm is summed shard by shard, in another order, so with clipping on the two runs differ by float
rounding (measured: 4e-9 in a weight after one step), which twelve steps at this lr amplify."""
import os

import pytest

import coin
from cli import UserError
from test_resume import args, assert_killed_mid_stage, assert_same_run, finish, start, stage, wait_for

TASKS = ["GQA"]


def two_ranks(mini_data, tiny_base, out, log, *extra):
    # 47 records in global batches of 4 = 2 ranks x 2 micro-batches of 1: the twelfth batch has 3, so rank 1 runs
    # one micro-batch and a filler
    return start(args(mini_data, tiny_base, out, "--micro_batch=1", "--global_batch=4", "--max_train=47",
                      "--max_grad_norm=1e9", "--dtype=bfloat16", "--grad_ckpt", *extra, tasks=TASKS), log, ranks=2)


def run(mini_data, tiny_base, out, log, *extra):
    proc = two_ranks(mini_data, tiny_base, out, log, *extra)
    assert finish(proc, log) == 0, open(log).read()[-3000:]


def killed_mid_stage(mini_data, tiny_base, out, log, *extra):
    """Start a run, SIGKILL both ranks once it has written a mid-stage checkpoint."""
    proc = two_ranks(mini_data, tiny_base, out, log, *extra)
    wait_for(os.path.join(stage(out, 0, TASKS), "midstage.pt"), proc, log)
    assert proc.poll() is None and len(proc.pids) == 2 and not proc.codes, proc.codes  # both ranks still running
    proc.kill()
    proc.wait()
    assert_killed_mid_stage(out, 0, TASKS)


@pytest.fixture(scope="module")
def unsharded(mini_data, tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("unsharded")
    run(mini_data, tiny_base, str(out / "run"), str(out / "log"))
    return str(out / "run")


@pytest.mark.parametrize("first,then", [("--shard=true", "--shard=false"), ("--shard=false", "--shard=true")])
def test_sharded_run_and_resume_across_sharding(mini_data, tiny_base, unsharded, tmp_path, first, then):
    out = str(tmp_path / "run")
    killed_mid_stage(mini_data, tiny_base, out, str(tmp_path / "first.log"), first)
    run(mini_data, tiny_base, out, str(tmp_path / "then.log"), then)
    logs = {arg: open(tmp_path / f"{name}.log").read() for name, arg in (("first", first), ("then", then))}
    assert "continuing after step" in logs[then]
    assert "sharded (FSDP2)" in logs["--shard=true"] and "sharded (FSDP2)" not in logs["--shard=false"]
    assert_same_run(out, unsharded, TASKS)


def test_shard_refuses_stage0():
    with pytest.raises(UserError, match="--shard with --stage0: stage 0 trains the whole tiny base unsharded"):
        coin.parse_config(["--shard", "--stage0"])
