"""`torchrun --nproc_per_node=2 coin.py` (gloo, CPU) trains what `python coin.py` trains, to the last bit, at the default
adapter dropout: each record's dropout masks come from its own seed, its place in the step's global batch
(moelora.record_seed), whichever rank and micro-batch it lands in, and each rank's share of a global batch is a run of
the single-rank run's micro-batches (coin.rank_micro_batches)."""
import json
import os
import socket

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

import coin
import moelora
from test_resume import finish, stage, start

# a global batch of 8 records (their token counts by place) split as (ranks, micro-batch, accumulation steps)
LENGTHS = [3, 5, 2, 4, 5, 1, 3, 4]
SPLITS = [(1, 4, 2), (2, 4, 1), (2, 2, 2), (1, 8, 1), (4, 2, 1)]


def probe(E, d, p):
    """A MoELoRA layer whose output shows its masks: A_i = I, B = I, router 0 (g_i = 1/E), scaling 1, so output
    block i is dropout_i(x) / E."""
    layer = moelora.MoELoRALinear(nn.Linear(d, E * d, bias=False), r=E * d, alpha=E * d, num_experts=E, dropout=p,
                                  key=3)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.lora_A.copy_(torch.eye(d).repeat(E, 1))  # A_i = I (d, d)
        layer.lora_B.copy_(torch.eye(E * d))  # B_i writes output block i
        if layer.router is not None:
            layer.router.weight.zero_()
    return layer.train()


def run_split(layer, ranks, micro_batch, accum, ckpt):
    """{place: (the record's output (L, E d), its input's gradient (L, d))} of one optimizer step's global batch run as
    coin.train_one_task runs it on `ranks` ranks: each rank's micro-batches (coin.rank_micro_batches), each record's
    seed from its place (moelora.record_seed), right-padded micro-batches, forward and backward inside
    dropout_records, the layer under gradient checkpointing with ckpt."""
    out, d = {}, layer.base.in_features
    for rank in range(ranks):
        for chunk in coin.rank_micro_batches(len(LENGTHS), rank, micro_batch * accum, micro_batch):
            lengths = [LENGTHS[i] for i in chunk]
            x = torch.ones(len(chunk), max(lengths), d, requires_grad=True)  # (B, T, d), padded to the longest
            with moelora.dropout_records([moelora.record_seed(7, 5, i) for i in chunk], lengths):
                y = checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
                (y * torch.arange(y.shape[-1])).sum().backward()  # recomputed here under checkpointing
            for b, i in enumerate(chunk):
                out[i] = y[b, :lengths[b]].detach(), x.grad[b, :lengths[b]]
    return out


@pytest.mark.parametrize("E", [1, 4])
def test_a_records_masks_do_not_depend_on_its_rank(E):
    """Every split of the global batch over ranks, micro-batches and accumulation steps gives each record the same
    masks, forward and in gradient checkpointing's recomputation; the masks differ between records and are dropout's
    (0 or 1 / (1 - p) times 1 / E); gradients equal those without checkpointing."""
    p, d = 0.3, 6
    layer = probe(E, d, p)
    runs = {(split, ckpt): run_split(layer, *split, ckpt) for split in SPLITS for ckpt in (False, True)}
    ref = runs[SPLITS[0], False]
    masks = {i: y * E * (1 - p) for i, (y, _) in ref.items()}  # (L, E d): 0 or 1
    assert all(torch.equal(m, m.round()) and m.max() == 1 for m in masks.values())
    assert 0.5 < torch.cat([m.flatten() for m in masks.values()]).mean() / (1 - p) < 1.5
    assert not torch.equal(masks[1][:4], masks[4][:4])  # two records of 5 tokens: masks of their own
    for key, run in runs.items():
        for i, (y, grad) in run.items():
            assert torch.equal(y, ref[i][0]), (key, i)  # exact: the probe's products add zeros
            torch.testing.assert_close(grad, ref[i][1], rtol=1e-6, atol=1e-6, msg=f"{key} record {i}")
    for split in SPLITS:  # the recomputed forward drew the same masks: the same gradients to the last bit
        for i, (_, grad) in runs[split, True].items():
            assert torch.equal(grad, runs[split, False][i][1]), (split, i)


def test_two_ranks_train_what_one_trains_with_dropout(mini_data, tiny_base, tmp_path):
    """Two tasks at --lora_dropout=0.05, a global batch of 4: one process (2 accumulation steps of 2 records) and two
    gloo ranks (a micro-batch of 2 each) write the same adapter and projector bits at every stage (the checksums in
    meta.json) and the same instruction-following matrix. 14 records a task: the last batch has 2, all on rank 0."""
    tasks = ["GQA", "VQAv2"]

    def argv(out):
        return [f"--data_dir={mini_data}", f"--base={tiny_base}", f"--out={out}", f"--tasks={','.join(tasks)}",
                "--experts=2", "--lora_r=8", "--lora_dropout=0.05", "--micro_batch=2", "--grad_accum=2",
                "--max_train=14", "--lr=1e-2", "--zero_shot=false", "--max_test=4", "--eval_batch=4",
                "--max_new_tokens=4", "--threads=1"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    coin.main(argv(one))
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start(argv(two), str(tmp_path / "two.log"), torchrun=["--nproc_per_node=2", f"--master_port={port}"])
    assert finish(proc, str(tmp_path / "two.log")) == 0, open(tmp_path / "two.log").read()[-3000:]
    for j in range(len(tasks)):
        got, want = (json.load(open(os.path.join(stage(d, j, tasks), "meta.json"))) for d in (two, one))
        assert got["world_size"] == 2 and want["world_size"] == 1
        assert got["checksum"] == want["checksum"], f"stage {j + 1}"
    results = [json.load(open(os.path.join(d, "results.json"))) for d in (two, one)]
    assert results[0]["matrix"] == results[1]["matrix"]
    adapter = load_file(os.path.join(stage(one, 0, tasks), "adapter.safetensors"))
    assert max(v.abs().max().item() for k, v in adapter.items() if k.endswith("lora_B")) > 1e-3  # it trained
