"""
The continual-learning baselines that coin.py trains besides plain sequential fine-tuning (--method). Each is a few
plain functions (or one small module class) that the training loop calls explicitly; the maths is in each docstring.

    --method=sequential   plain sequential fine-tuning, the paper's LoRA / MoELoRA rows (nothing from this file)
    --method=replay       Replay: a seeded sample of earlier tasks' training records mixed into each later task
    --method=ewc          EWC (Kirkpatrick et al. 2017, arXiv 1612.00796): a Fisher-weighted pull to the last weights
    --method=lwf          LwF (Li & Hoiem 2016, arXiv 1606.09282): distil the previous stage's model on the new inputs
    --method=olora        O-LoRA (Wang et al. 2023, arXiv 2310.14152): one LoRA subspace per task, kept orthogonal

CoIN (arXiv 2403.08350) compares MoELoRA with LwF and EWC; Replay and O-LoRA are what later CL benchmarks of
multimodal LLMs ship besides them. Replay, EWC and LwF work on any adapter (--experts=1 LoRA, >1 MoELoRA); O-LoRA is
its own adapter (OLoRALinear below), a LoRA per task. Every regulariser here is normalised like coin's task loss: a
term added once per optimizer step (EWC, O-LoRA) is on the scale of the per-answer-token cross-entropy, and LwF's
distillation is summed over answer tokens and divided by the global batch's answer-token count, as the cross-entropy.
"""
import hashlib
import random

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("sequential", "replay", "ewc", "lwf", "olora")


# -----------------------------------------------------------------------------
# Replay (experience replay: Rolnick et al. 2019, arXiv 1811.11682; Chaudhry et al. 2019, arXiv 1902.10486)

def replay_records(train_sets, earlier_tasks, n_current, ratio, seed, stage):
    """The earlier tasks' records mixed into stage `stage`'s training set: round(ratio * n_current) records in all,
    split evenly over `earlier_tasks` (the first few tasks take one more when it does not divide), each task's share a
    seeded uniform sample without replacement of its training records (capped by its size). The same records for the
    same (seed, stage, train sets), whatever the ranks or a resume: nothing needs saving.

    The amount is a fraction of the current task (TRACE's 0.1 by default; EasyCL uses 0.3) rather than a fixed
    buffer (PRISM keeps ~180 records): a fraction means the same mix at CoIN-mini's size and at CoIN's, whose tasks
    hold 10^4-10^5 records, where a buffer of 180 would be a rounding error next to each new task (and the whole of a
    small task on CoIN-mini). Even shares keep every earlier task in the mix, however unequal their sizes."""
    if not earlier_tasks or ratio <= 0:
        return []
    n = round(ratio * n_current)
    rng = random.Random(f"{seed}-replay-{stage}")
    out = []
    for k, task in enumerate(earlier_tasks):
        share = n // len(earlier_tasks) + (k < n % len(earlier_tasks))
        pool = train_sets[task]
        out += [pool[i] for i in sorted(rng.sample(range(len(pool)), min(share, len(pool))))]
    return out


# -----------------------------------------------------------------------------
# EWC: elastic weight consolidation (Kirkpatrick et al. 2017, arXiv 1612.00796)

def ewc_sample(n_records, samples, seed, stage):
    """Indices of the task's training records the Fisher is estimated on: min(samples, n_records) of them, a seeded
    uniform sample, in increasing order. (The CoIN authors' variant is reported to take the first 1,000 records; a
    sample is the same at any size and does not depend on how the task file is sorted.)"""
    return sorted(random.Random(f"{seed}-ewc-{stage}").sample(range(n_records), min(samples, n_records)))


def ewc_fisher(named_params, record_loss, indices, rank=0, world=1):
    """The diagonal empirical Fisher of the weights `named_params` ([(name, parameter)]):

        F_i = 1/N sum_{n in indices} (d loss_n / d theta_i)^2,        N = len(indices)

    where loss_n = record_loss(n) is record n's own training loss (its answer tokens' mean cross-entropy: the loss
    coin's step gives a global batch of that one record). One backward per record (per-record gradients: the squares
    of a batch's mean gradient would be another, smaller estimate). The records are striped over the ranks
    (indices[rank::world]) and the sums all-reduced, in float64, so 2 ranks give the 1-rank result (to float32
    rounding). Returns {name: F (float32, the weight's shape)}. The caller puts the model in eval mode (no dropout)."""
    params = [p for _, p in named_params]
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for n in indices[rank::world]:
        grads = torch.autograd.grad(record_loss(n), params, allow_unused=True)
        for s, g in zip(sums, grads):
            if g is not None:
                s += g.double() ** 2
    if world > 1:
        flat = torch.cat([s.flatten() for s in sums])
        dist.all_reduce(flat)
        sums = [f.view_as(s) for f, s in zip(flat.split([s.numel() for s in sums]), sums)]
    return {name: (s / len(indices)).float() for (name, _), s in zip(named_params, sums)}


def ewc_accumulate(fisher_so_far, fisher_new):
    """How the tasks' Fisher terms combine: summed, with one anchor, the weights at the end of the latest task.

        F^(t) = F^(t-1) + F_t,     theta*^(t) = theta after task t

    This is online EWC with no decay (Schwarz et al. 2018, arXiv 1805.06370, gamma = 1; Huszar 2018, arXiv
    1712.03847, shows the one-penalty form is the principled one): two tensors per weight whatever the number of
    tasks, instead of Kirkpatrick et al.'s one penalty (Fisher and anchor) per earlier task."""
    if fisher_so_far is None:
        return dict(fisher_new)
    assert fisher_so_far.keys() == fisher_new.keys(), sorted(fisher_so_far.keys() ^ fisher_new.keys())[:5]
    return {name: fisher_so_far[name] + f for name, f in fisher_new.items()}


def ewc_penalty(named_params, fisher, anchor, lam):
    """(lambda / 2) * sum_i F_i (theta_i - theta*_i)^2 over the weights `named_params`, a scalar with a gradient
    lambda * F_i (theta_i - theta*_i). `fisher` and `anchor` map the same names to tensors of the weights' shapes.
    Added once per optimizer step to a loss that is a per-answer-token mean, so lambda is relative to that scale."""
    total = 0.0
    for name, p in named_params:
        total = total + (fisher[name] * (p - anchor[name]) ** 2).sum()
    return 0.5 * lam * total


# -----------------------------------------------------------------------------
# LwF: learning without forgetting (Li & Hoiem 2016, arXiv 1606.09282)

@torch.no_grad()
def teacher_logits(model, teacher_weights, inputs):
    """The previous stage's model on `inputs`: the same module with the teacher's trainable weights
    ({name: tensor}, the adapter and projector at the end of the previous stage) swapped in for this forward only
    (torch.func.functional_call; the frozen base is shared, not copied), in eval mode (no dropout, so no random
    numbers drawn: the student's dropout masks are those of a run without LwF). Returns the logits (B, T, vocab).
    NOTE(fidelity): the CoIN authors' LwF is reported to cache the old model's outputs on 100 random new-task records
    before training; here the teacher runs on every record of the new task, on the fly: exact, at the cost of one
    extra forward (no backward) per micro-batch (bench/methods.py measures it), and nothing to store or resume."""
    was_training = model.training
    model.eval()
    try:
        return torch.func.functional_call(model, teacher_weights, args=(), kwargs=inputs).logits
    finally:
        model.train(was_training)


def lwf_distillation(student_logits, teacher_logits, labels, temperature):
    """Knowledge distillation on the answer positions, summed (the caller divides by the global batch's answer-token
    count, as the cross-entropy):

        KD = T^2 * sum_{answer positions} KL(p_old^T || p_new^T),    p^T = softmax(logits / T)

    Positions are shifted as in the cross-entropy (position t predicts token t+1, counted where labels[t+1] != -100).
    T^2 keeps the gradient's scale independent of T (Hinton et al. 2015, arXiv 1503.02531). coin's loss with LwF is

        loss = CE + lwf_alpha * KD        (Li & Hoiem's L_new + lambda_o * L_old; their lambda_o = 1)

    student_logits, teacher_logits: (B, T, vocab); labels: (B, T)."""
    answer = labels[:, 1:] != -100  # (B, T-1)
    student = F.log_softmax(student_logits[:, :-1][answer].float() / temperature, dim=-1)  # (tokens, vocab)
    teacher = F.log_softmax(teacher_logits[:, :-1][answer].float() / temperature, dim=-1)  # (tokens, vocab)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature ** 2


# -----------------------------------------------------------------------------
# O-LoRA: orthogonal subspace learning (Wang et al. 2023, arXiv 2310.14152)

class OLoRALinear(nn.Module):
    """A frozen nn.Linear (self.base) plus one LoRA per task seen so far; only the newest trains:

        y = W0 x + (alpha / r) * sum_{i=1..t} B_i A_i dropout(x)        A_i: (r, d_in), B_i: (d_out, r)

    add_subspace() starts task t's (A_t ~ N(0, 0.01^2), B_t = 0, so the model is unchanged) and freezes A_i, B_i of
    the earlier tasks, which keep contributing. State-dict keys <name>.lora_A.<i>, <name>.lora_B.<i>, i = 0..t-1.
    NOTE(fidelity): A_t is drawn as coin's LoRA draws its A (the official MoELoRA's N(0, 0.01^2)), not PEFT's
    Kaiming-uniform that O-LoRA's code inherits, so that O-LoRA differs from coin's LoRA row only in the method; one
    dropout mask is shared by all subspaces."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        assert isinstance(base, nn.Linear), f"OLoRALinear wraps an nn.Linear, got {type(base).__name__}"
        self.base = base.requires_grad_(False)
        self.r, self.scaling, self.dropout = r, alpha / r, dropout
        self.lora_A, self.lora_B = nn.ParameterList(), nn.ParameterList()

    def add_subspace(self, generator):
        for p in self.parameters():
            p.requires_grad_(False)
        d_in, d_out, device = self.base.in_features, self.base.out_features, self.base.weight.device
        self.lora_A.append(nn.Parameter((torch.randn(self.r, d_in, generator=generator) * 0.01).to(device)))
        self.lora_B.append(nn.Parameter(torch.zeros(d_out, self.r, device=device)))

    def forward(self, x):  # x: (..., d_in)
        y = self.base(x)  # (..., d_out)
        if not len(self.lora_A):
            return y
        h = x.to(self.lora_A[0].dtype)
        if self.training and self.dropout > 0:
            h = F.dropout(h, self.dropout)
        A = torch.cat(list(self.lora_A))  # (t r, d_in): every subspace in one product
        B = torch.cat(list(self.lora_B), dim=1)  # (d_out, t r)
        return y + ((h @ A.t()) @ B.t() * self.scaling).to(y.dtype)


def olora_layers(model):
    return [m for m in model.modules() if isinstance(m, OLoRALinear)]


def add_olora(model, names, r, alpha, dropout):
    """Wrap the nn.Linear layers `names` (coin wraps moelora.language_model_linears(model)) in OLoRALinear, with no
    subspace yet (the model computes as the base until add_olora_subspace)."""
    assert not olora_layers(model), "the model has O-LoRA layers already: add_olora runs once"
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, OLoRALinear(model.get_submodule(name), r, alpha, dropout))
    return names


def add_olora_subspace(model, seed, stage):
    """Task `stage`'s subspace in every O-LoRA layer, earlier ones frozen. Drawn from a generator seeded by
    (seed, stage) alone, so a resumed run draws the same A_t as one that never stopped."""
    g = torch.Generator().manual_seed(int(hashlib.sha1(f"{seed}-olora-{stage}".encode()).hexdigest()[:15], 16))
    for m in olora_layers(model):
        m.add_subspace(g)


def olora_state_dict(model):
    """Every subspace of every O-LoRA layer, the frozen ones too, keyed as in model.state_dict()."""
    return {f"{module_name}.{name}": p for module_name, m in model.named_modules() if isinstance(m, OLoRALinear)
            for name, p in m.named_parameters() if not name.startswith("base.")}


def olora_orthogonality(model):
    """sum over adapted layers, over earlier tasks i < t, of sum_{j,k} |(A_t A_i^T)_{jk}|: A_t A_i^T is (r, r), zero
    when the rows of A_t (the directions task t reads) are orthogonal to task i's. A scalar tensor (0 at task 1)."""
    terms = [(m.lora_A[-1] @ A_i.t()).abs().sum() for m in olora_layers(model) for A_i in list(m.lora_A)[:-1]]
    return sum(terms) if terms else torch.zeros(())


def olora_penalty(model, lambda1, lambda2):
    """O-LoRA's regulariser of task t's subspace:

        lambda1 * olora_orthogonality(model)  +  lambda2 * sum_layers (||A_t||^2 + ||B_t||^2)

    The element-wise absolute sum is how TRACE and PRISM implement the paper's orthogonality loss; lambda1 = 0.5,
    lambda2 = 0 are their defaults. Only A_t, B_t get a gradient (the earlier subspaces are frozen). coin adds it once
    per optimizer step to the per-answer-token cross-entropy, from task 2 on (from task 1 with lambda2 > 0)."""
    total = lambda1 * olora_orthogonality(model)
    if lambda2:
        newest = [p for m in olora_layers(model) for p in (m.lora_A[-1], m.lora_B[-1])]
        total = total + lambda2 * sum(p.pow(2).sum() for p in newest)
    return total
