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
from moelora import adapter_parameters, load_weights


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
    # forked, not spawned: a spawned rank spends seconds importing torch again
    mp.start_processes(_fisher_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "f2.pt")), nprocs=2,
                       start_method="fork")
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
# O-LoRA, against transcriptions of the official code (github.com/cmnfriend/O-LoRA, the repository's last commit)

def olora_net(r=2, tasks=3, seed=0, init="kaiming"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    for p in net.parameters():
        p.requires_grad_(False)
    methods.add_olora(net, ["0", "2"], r=r, alpha=4.0, dropout=0.0, tasks=tasks)
    methods.init_subspaces(net, seed, init)
    return net


def official_olora_layer(x, weight, bias, lora_A, lora_B, loranew_A, loranew_B, scaling):
    """src/peft/tuners/lora.py, Linear.forward (lines 570-597), transcribed: the earlier tasks' LoRA (their A's and
    B's concatenated into one lora_A, lora_B) and the new one, each through its nn.Linear, one dropout (here p = 0)."""
    result = F.linear(x, weight, bias=bias)
    result += F.linear(F.linear(x, lora_A), lora_B) * scaling
    result += F.linear(F.linear(x, loranew_A), loranew_B) * scaling
    return result


def official_olora_regulariser(named_parameters, lamda_1, lamda_2):
    """src/uie_trainer_lora.py, UIETrainer.training_step (lines 90-109), transcribed."""
    orthogonal_loss = 0.
    for name, param in named_parameters:
        if "lora_A" in name:
            for name_, param_ in named_parameters:
                if "loranew_A" in name_ and name.split("lora_A")[0] == name_.split("loranew_A")[0]:
                    orthogonal_loss += torch.abs(torch.mm(param, param_.T)).sum()  # [r * dim] * [dim * r]
                    break
    l2_loss = 0.
    for name, param in named_parameters:
        if "loranew_" in name:
            l2_loss += torch.norm(param, p=2)
    return orthogonal_loss * lamda_1 + l2_loss * lamda_2


def official_layout(net):
    """coin's O-LoRA layers as the official model names them: lora_A/B the earlier tasks' concatenated, loranew_A/B
    the newest task's (the same tensors: gradients flow back to coin's)."""
    named = []
    for name, m in (("0", net[0]), ("2", net[2])):
        t = m.active - 1
        named += [(f"{name}.lora_A", torch.cat(list(m.lora_A)[:t])), (f"{name}.lora_B", torch.cat(
            list(m.lora_B)[:t], dim=1)), (f"{name}.loranew_A", m.lora_A[t]), (f"{name}.loranew_B", m.lora_B[t])]
    return named


def test_olora_layer_equals_the_official_layer_and_trains_only_the_newest():
    net = olora_net()
    x = torch.randn(4, 5)
    base = nn.Sequential(net[0].base, nn.ReLU(), net[2].base)
    torch.testing.assert_close(net(x), base(x))  # no subspace active: the base
    with torch.no_grad():  # B = 0 starts each subspace at no change; give them values to check the sum
        for m in methods.olora_layers(net):
            for B in m.lora_B:
                B.normal_()
    methods.set_active(net, 3)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A.2", "0.lora_B.2", "2.lora_A.2", "2.lora_B.2"]
    m = net[0]
    got = m(x)
    want = official_olora_layer(x, m.base.weight, m.base.bias, torch.cat(list(m.lora_A)[:2]),
                                torch.cat(list(m.lora_B)[:2], dim=1), m.lora_A[2], m.lora_B[2], m.scaling)
    torch.testing.assert_close(got, want)
    methods.set_active(net, 2)  # the third task's LoRA does not count before its stage
    want = official_olora_layer(x, m.base.weight, m.base.bias, m.lora_A[0], m.lora_B[0], m.lora_A[1], m.lora_B[1],
                                m.scaling)
    torch.testing.assert_close(m(x), want)
    net(x).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in net.parameters())


def test_olora_init_is_peft_kaiming_seeded_by_stage_alone():
    a, b = olora_net(tasks=2, seed=5), olora_net(tasks=3, seed=5)
    for t in range(2):  # the same draws whatever the number of tasks
        assert torch.equal(a[0].lora_A[t], b[0].lora_A[t]) and torch.equal(a[2].lora_A[t], b[2].lora_A[t])
    assert not torch.equal(a[0].lora_A[0], a[0].lora_A[1])
    assert not torch.equal(a[0].lora_A[0], olora_net(tasks=2, seed=6)[0].lora_A[0])
    assert all(not B.any() for m in methods.olora_layers(b) for B in m.lora_B)
    # PEFT's reset_lora_parameters (the official src/peft/tuners/lora.py, line 505): kaiming_uniform_(a=sqrt(5)), i.e.
    # uniform in +-1/sqrt(d_in); drawn here from task t's own generator, layer after layer
    g = methods.seeded_generator(5, "olora", 1)
    want = [torch.nn.init.kaiming_uniform_(torch.empty(2, d), a=math.sqrt(5), generator=g) for d in (5, 6)]
    assert torch.equal(b[0].lora_A[1], want[0]) and torch.equal(b[2].lora_A[1], want[1])
    assert b[0].lora_A[1].abs().max() <= 1 / math.sqrt(5)
    g = methods.seeded_generator(5, "olora", 1)
    normal = olora_net(tasks=2, seed=5, init="normal")  # coin's LoRA init: N(0, 0.01^2)
    assert torch.equal(normal[0].lora_A[1], torch.randn(2, 5, generator=g) * 0.01)


def test_olora_subspaces_round_trip_through_a_checkpoint():
    a, b = olora_net(seed=5), olora_net(seed=7)
    with torch.no_grad():
        a[0].lora_B[1].normal_()
    sd = {k: v.detach().clone() for k, v in adapter_parameters(a)}
    assert sorted(sd) == sorted(f"{layer}.lora_{m}.{i}" for layer in "02" for m in "AB" for i in range(3))
    with pytest.raises(ValueError, match=r"adapter weight 0.lora_A.0: checkpoint shape \(3, 5\)"):
        load_weights(dict(adapter_parameters(b)), {**sd, "0.lora_A.0": torch.zeros(3, 5)}, "b's subspaces")
    load_weights(dict(adapter_parameters(b)), sd, "b's subspaces")  # what checkpoint.load_trainable does
    methods.set_active(a, 2)
    methods.set_active(b, 2)
    x = torch.randn(2, 5)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("lambda1, lambda2", [(0.5, 0.0), (0.5, 0.3), (0.0, 1.0)])
def test_olora_penalty_and_gradient_equal_the_official_code(lambda1, lambda2):
    net = olora_net(r=3)
    with torch.no_grad():
        for m in methods.olora_layers(net):
            for B in m.lora_B:
                B.normal_()
    methods.set_active(net, 3)
    got = methods.olora_penalty(net, lambda1, lambda2)  # l2="norm", the default
    got.backward()
    newest = [p for p in net.parameters() if p.requires_grad]
    got_grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in newest]
    net.zero_grad()
    want = official_olora_regulariser(official_layout(net), lambda1, lambda2)
    want.backward()
    torch.testing.assert_close(got, want)
    for g, p in zip(got_grads, newest):
        torch.testing.assert_close(g, torch.zeros_like(p) if p.grad is None else p.grad)
    assert all(p.grad is None for n, p in net.named_parameters() if not n.endswith(".2"))
    # the paper's squared reading is a switch, and differs
    squared = methods.olora_penalty(net, lambda1, lambda2, l2="squared").item()
    assert (squared != pytest.approx(want.item())) == bool(lambda2)


def test_olora_defaults_are_the_official_ones():
    """The official scripts run --lamda_1 0.5 --lamda_2 0 (scripts/order_1.sh, lines 42-43), adapt Llama's q_proj and
    v_proj (PEFT's default targets, src/peft/utils/other.py line 202) and train only loranew_ (src/run_uie_lora.py,
    lines 406-416)."""
    defaults = methods.OLoRA.Settings()
    assert (defaults.olora_lambda1, defaults.olora_lambda2) == (0.5, 0.0)
    assert defaults.olora_targets == "q_proj,v_proj" and defaults.olora_init == "kaiming"
    assert defaults.olora_l2 == "norm" and defaults.olora_projector is False
