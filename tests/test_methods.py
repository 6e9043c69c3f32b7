"""methods.py against written-out references on tiny modules: the EWC penalty, its gradient and the Fisher estimate
(also on 2 gloo ranks), LwF's distillation, O-LoRA's adapter and orthogonality term, the replay sample."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import methods
from moelora import load_weights


# -----------------------------------------------------------------------------
# Replay

def test_replay_sample_is_seeded_sized_and_from_earlier_tasks_only():
    train_sets = {"A": [{"id": f"a{i}"} for i in range(50)], "B": [{"id": f"b{i}"} for i in range(7)],
                  "C": [{"id": f"c{i}"} for i in range(40)]}
    got = methods.replay_records(train_sets, ["A", "B"], 40, 0.25, seed=3, stage=2)
    assert len(got) == 10  # round(0.25 x 40), 5 from each earlier task
    assert sum(r["id"].startswith("a") for r in got) == 5 and sum(r["id"].startswith("b") for r in got) == 5
    assert len({r["id"] for r in got}) == 10  # without replacement
    assert got == methods.replay_records(train_sets, ["A", "B"], 40, 0.25, seed=3, stage=2)  # same (seed, stage)
    assert got != methods.replay_records(train_sets, ["A", "B"], 40, 0.25, seed=4, stage=2)
    assert got != methods.replay_records(train_sets, ["A", "B"], 40, 0.25, seed=3, stage=1)
    # an uneven split: the first tasks take the remainder; a share larger than a task is capped by its size
    got = methods.replay_records(train_sets, ["A", "B"], 100, 0.21, seed=0, stage=2)
    assert [sum(r["id"].startswith(t) for r in got) for t in "ab"] == [11, 7]
    assert methods.replay_records(train_sets, [], 40, 0.25, seed=0, stage=0) == []
    assert methods.replay_records(train_sets, ["A"], 40, 0.0, seed=0, stage=1) == []


# -----------------------------------------------------------------------------
# EWC

def tiny_regression(seed=0):
    """A 2-layer net and 9 records (x, y): small enough to write every gradient out by hand."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    xs, ys = torch.randn(9, 3, generator=g), torch.randn(9, 2, generator=g)
    record_loss = lambda n: F.mse_loss(net(xs[n]), ys[n])
    return net, record_loss


def test_ewc_penalty_and_its_gradient():
    net, _ = tiny_regression()
    named = list(net.named_parameters())
    fisher = {n: torch.rand(p.shape) for n, p in named}
    anchor = {n: p.detach() + torch.randn(p.shape) for n, p in named}
    pen = methods.ewc_penalty(named, fisher, anchor, lam=0.3)
    want = 0.3 / 2 * sum(float((fisher[n] * (p.detach() - anchor[n]) ** 2).sum()) for n, p in named)
    assert math.isclose(pen.item(), want, rel_tol=1e-6)
    pen.backward()
    for n, p in named:
        torch.testing.assert_close(p.grad, 0.3 * fisher[n] * (p.detach() - anchor[n]))
    # at the anchor the penalty and its gradient are zero
    assert methods.ewc_penalty(named, fisher, {n: p.detach() for n, p in named}, lam=0.3).item() == 0


def test_ewc_fisher_is_the_mean_squared_per_record_gradient():
    net, record_loss = tiny_regression()
    named = list(net.named_parameters())
    indices = [0, 2, 3, 7, 8]
    want = {n: torch.zeros_like(p) for n, p in named}
    for i in indices:  # one backward per record, written out
        net.zero_grad()
        record_loss(i).backward()
        for n, p in named:
            want[n] += p.grad ** 2 / len(indices)
    got = methods.ewc_fisher(named, record_loss, indices)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    # one rank's stripe of a 2-rank estimate covers the records 0, 3, 8 only
    half = methods.ewc_fisher(named, record_loss, indices, rank=0, world=1)
    assert all(torch.equal(half[n], got[n]) for n in got)


def _fisher_on_rank(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    net, record_loss = tiny_regression()
    fisher = methods.ewc_fisher(list(net.named_parameters()), record_loss, list(range(9)), rank, world)
    if rank == 0:
        torch.save(fisher, out)
    dist.destroy_process_group()


def test_ewc_fisher_on_two_gloo_ranks_equals_one(tmp_path):
    mp.spawn(_fisher_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "f2.pt")), nprocs=2)
    two = torch.load(tmp_path / "f2.pt")
    net, record_loss = tiny_regression()
    one = methods.ewc_fisher(list(net.named_parameters()), record_loss, list(range(9)))
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-6, atol=0)


def test_ewc_sample_and_accumulation():
    idx = methods.ewc_sample(100, 30, seed=1, stage=2)
    assert len(idx) == 30 == len(set(idx)) and idx == sorted(idx) and idx == methods.ewc_sample(100, 30, 1, 2)
    assert idx != methods.ewc_sample(100, 30, 1, 3)
    assert methods.ewc_sample(12, 1000, 0, 0) == list(range(12))  # capped by the task size
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.5, 0.0])}
    assert torch.equal(methods.ewc_accumulate(None, a)["w"], a["w"])
    assert torch.equal(methods.ewc_accumulate(a, b)["w"], torch.tensor([1.5, 2.0]))
    with pytest.raises(AssertionError):
        methods.ewc_accumulate(a, {"v": b["w"]})


# -----------------------------------------------------------------------------
# LwF

def test_lwf_distillation_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)  # (B, T, vocab)
    labels = torch.full((2, 5), -100)
    labels[0, 3:], labels[1, 2] = 4, 1  # answer tokens: (0, 3), (0, 4), (1, 2); predicted at positions t - 1
    T = 2.0
    want = 0.0
    for b, t in [(0, 2), (0, 3), (1, 1)]:
        p_old, p_new = F.softmax(teacher[b, t] / T, -1), F.softmax(student[b, t] / T, -1)
        want += T ** 2 * sum(p_old[v] * math.log(p_old[v] / p_new[v]) for v in range(7))
    got = methods.lwf_distillation(student, teacher, labels, T)
    assert math.isclose(got.item(), float(want), rel_tol=1e-5)
    assert methods.lwf_distillation(student, student.clone(), labels, T).item() == pytest.approx(0, abs=1e-6)
    # only the answer positions count: changing the teacher elsewhere changes nothing
    other = teacher.clone()
    other[0, 0], other[1, 3] = 100.0, -100.0
    assert methods.lwf_distillation(student, other, labels, T).item() == got.item()


class TinyLM(nn.Module):
    """A stand-in with a Hugging Face-like interface (kwargs in, .logits out) and dropout."""

    def __init__(self):
        super().__init__()
        self.emb, self.drop, self.head = nn.Embedding(11, 6), nn.Dropout(0.5), nn.Linear(6, 11)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.head(self.drop(self.emb(input_ids)))})()


def test_teacher_logits_swap_in_weights_without_dropout_or_side_effects():
    torch.manual_seed(0)
    model = TinyLM().train()
    teacher = {"head.weight": torch.randn(11, 6), "head.bias": torch.randn(11)}
    ids = torch.randint(0, 11, (2, 4))
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    got = methods.teacher_logits(model, teacher, {"input_ids": ids})
    assert torch.equal(torch.get_rng_state(), rng)  # eval mode: no dropout mask drawn
    assert model.training and all(torch.equal(p, own[n]) for n, p in model.named_parameters())
    want = F.linear(model.emb(ids), teacher["head.weight"], teacher["head.bias"])  # the teacher, written out
    torch.testing.assert_close(got, want)
    assert not got.requires_grad


# -----------------------------------------------------------------------------
# O-LoRA

def olora_net(r=2):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    for p in net.parameters():
        p.requires_grad_(False)
    methods.add_olora(net, ["0", "2"], r=r, alpha=4.0, dropout=0.0)
    return net


def test_olora_adapter_sums_every_subspace_and_trains_only_the_newest():
    net = olora_net()
    x = torch.randn(4, 5)
    base = nn.Sequential(net[0].base, nn.ReLU(), net[2].base)
    torch.testing.assert_close(net(x), base(x))  # no subspace: the base
    for stage in range(3):
        methods.add_olora_subspace(net, seed=0, stage=stage)
        with torch.no_grad():  # B = 0 starts each subspace at no change; give them values to check the sum
            for m in methods.olora_layers(net):
                m.lora_B[-1].normal_()
    assert [len(m.lora_A) for m in methods.olora_layers(net)] == [3, 3]
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A.2", "0.lora_B.2", "2.lora_A.2", "2.lora_B.2"]

    def written_out(m, h):
        return m.base(h) + sum(m.scaling * h @ A.t() @ B.t() for A, B in zip(m.lora_A, m.lora_B))
    torch.testing.assert_close(net(x), written_out(net[2], torch.relu(written_out(net[0], x))))
    net(x).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in net.parameters())


def test_olora_subspaces_are_seeded_by_stage_and_round_trip():
    a, b = olora_net(), olora_net()
    for stage in range(2):
        methods.add_olora_subspace(a, seed=5, stage=stage)
    methods.add_olora_subspace(b, seed=5, stage=1)
    assert torch.equal(a[0].lora_A[1], b[0].lora_A[0])  # stage 1's draw, whatever came before it
    assert not torch.equal(a[0].lora_A[0], a[0].lora_A[1])
    sd = {k: v.detach().clone() for k, v in methods.olora_state_dict(a).items()}
    assert sorted(sd) == sorted(f"{layer}.lora_{m}.{i}" for layer in "02" for m in "AB" for i in range(2))
    with pytest.raises(KeyError, match="4 unexpected"):  # b has one subspace: rebuild two before loading
        load_weights(methods.olora_state_dict(b), sd, "b's subspaces")
    methods.add_olora_subspace(b, seed=5, stage=2)
    with pytest.raises(ValueError, match=r"adapter weight 0.lora_A.0: checkpoint shape \(3, 5\)"):
        load_weights(methods.olora_state_dict(b), {**sd, "0.lora_A.0": torch.zeros(3, 5)}, "b's subspaces")
    load_weights(methods.olora_state_dict(b), sd, "b's subspaces")  # what checkpoint.load_trainable does
    x = torch.randn(2, 5)
    assert torch.equal(a(x), b(x))


def test_olora_penalty_against_written_out_sums():
    net = olora_net(r=3)
    assert methods.olora_orthogonality(olora_net()).item() == 0  # nothing to be orthogonal to yet
    for stage in range(3):
        methods.add_olora_subspace(net, seed=0, stage=stage)
    with torch.no_grad():
        for m in methods.olora_layers(net):
            m.lora_B[-1].normal_()
    total, orth = methods.olora_penalty(net, 0.5, 0.25), methods.olora_orthogonality(net).item()
    want_orth = want_l2 = 0.0
    for m in (net[0], net[2]):
        A = [a.detach() for a in m.lora_A]
        for i in range(2):
            want_orth += sum(abs(float(A[2][j] @ A[i][k])) for j in range(3) for k in range(3))
        want_l2 += float((A[2] ** 2).sum() + (m.lora_B[2].detach() ** 2).sum())
    assert math.isclose(orth, want_orth, rel_tol=1e-5)
    assert math.isclose(total.item(), 0.5 * want_orth + 0.25 * want_l2, rel_tol=1e-5)
    total.backward()
    assert all(p.grad is None for n, p in net.named_parameters() if not n.endswith(".2"))
    sign = torch.sign(net[0].lora_A[2].detach() @ net[0].lora_A[0].detach().t())  # d|A_t A_0^T| / dA_t, + A_1's
    want_grad = 0.5 * (sign @ net[0].lora_A[0].detach()
                       + torch.sign(net[0].lora_A[2].detach() @ net[0].lora_A[1].detach().t()) @ net[0].lora_A[1])
    torch.testing.assert_close(net[0].lora_A[2].grad, want_grad + 0.25 * 2 * net[0].lora_A[2].detach())
