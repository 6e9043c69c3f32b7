"""
The continual-learning methods: each is one small class behind one API, and the training loop (coin.py) knows none
of them by name. `--method` picks a class from METHODS; the maths is in each docstring.

    --method=sequential   plain sequential fine-tuning, the paper's LoRA / MoELoRA rows: the base class, Method
    --method=replay       Replay: a seeded sample of earlier tasks' training records mixed into each later task
    --method=ewc          EWC (Kirkpatrick et al. 2017, arXiv 1612.00796): a Fisher-weighted pull to the last weights
    --method=lwf          LwF (Li & Hoiem 2016, arXiv 1606.09282): distil the previous stage's model on the new inputs
    --method=olora        O-LoRA (Wang et al. 2023, arXiv 2310.14152): one LoRA subspace per task, kept orthogonal
    --method=reglora      RegLoRA (SEFE: Chen et al. 2025, arXiv 2505.02486): a LoRA per task, merged, key entries held
    --method=magmax       MagMax (Marczak et al. 2024, arXiv 2407.06322): evaluated as the max-magnitude task vector
    --method=merge_mean   the mean of task vectors, MagMax's simplest merging baseline
    --method=hide         HiDe-LLaVA (Guo et al., ACL 2025): a LoRA expert per task, weighed by CLIP features at test
    --method=disco        DISCO (MCITlib): a LoRA slice per task, every layer's weighed by CLIP text features

CoIN (arXiv 2403.08350) compares MoELoRA with LwF and EWC; Replay and O-LoRA are what later CL benchmarks of
multimodal LLMs ship besides them. Replay, EWC and LwF work on any adapter (--experts=1 LoRA, >1 MoELoRA); O-LoRA
builds its own (OLoRALinear below), a LoRA per task.

The loop calls a method's hooks at five points (docs/methods.md, "Write your own method"):

    method.add_adapter(model, n_stages)                  once, on the frozen base: wrap its linears (MoELoRA here)
    for each stage j:
        records = method.start_stage(model, stage, records, state)     the model holds stage j-1's weights
        per micro-batch:  loss += method.loss_term(model, inputs, logits, labels)   (a sum over answer tokens)
        per step:         loss += method.penalty(model)     once, after the ranks' gradients are summed
        state = method.end_stage(model, stage, dataset, state)   tensors to keep; may rewrite the weights
        save the stage's weights and `state` (checksummed); on resume `state` is read back from there
        with method.evaluating(model, stage, state) as evaluation:  evaluate every task seen so far
            after each task's answers, on every rank:  evaluation.task_done(task)   (unless evaluation is None)

Rules a method keeps, so that a resumed run and N ranks give the weights of one uninterrupted run: it draws no number
from torch's global random stream (seed its own generator from (seed, stage)); what it needs in a later stage goes
through end_stage's state (or is a function of the seed and the stage), never a file of its own; its penalty is added
once per optimizer step; its loss terms are normalised as the cross-entropy (summed over answer tokens, the loop
divides by the global batch's answer-token count), so a strength means the same at any batch split.
"""
import contextlib
import dataclasses
import hashlib
import math
import random
import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cli
import data
from base_model import projector
from moelora import AdapterLayer, adapter_parameters, add_moelora, record_dropout, target_linears, wrap_linears


@dataclasses.dataclass
class Stage:
    """What a method's hooks are told about the stage they run in."""
    index: int           # j: 0 for the first stage
    name: str            # its task (or "MultiTask")
    count: int           # the stages of the run
    earlier: list        # the tasks trained before this stage, in order
    train_sets: dict     # {task: train records} of every task of the run (Replay samples the earlier ones)
    seed: int            # the run's --seed
    rank: int
    world: int
    device: torch.device
    record_loss: object  # (dataset, i) -> record i's mean answer-token cross-entropy, with its graph (coin.py)

    @property
    def last(self):
        return self.index == self.count - 1


def seeded_generator(seed, method, stage):
    """A CPU generator seeded by (seed, method, stage) alone: what a method draws does not touch torch's global stream
    (the dropout masks) and is drawn again the same on resume."""
    return torch.Generator().manual_seed(int(hashlib.sha1(f"{seed}-{method}-{stage}".encode()).hexdigest()[:15], 16))


def trainable(model):
    """[(name, parameter)] that train now, in the model's order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# -----------------------------------------------------------------------------
# The base class: plain sequential fine-tuning (the paper's LoRA and MoELoRA rows)

class Method:
    """Plain sequential fine-tuning: one MoELoRA (--experts=1: LoRA) carried from task to task, nothing else. The base
    of every method: each hook is a no-op here, so a method overrides only the points it changes.

    Class attributes a method sets: `name` (its --method), `Settings` (a dataclass of its own settings, each line's
    comment its --help line; coin.py's Config takes them in), `rules` ({setting: cli.Rule}), `before_added`
    ({setting: the value runs written before it existed had in effect}, when that is not its default), `shardable`
    (whether it may run under --shard: its state kept whole is fine only if it holds no weight-sized tensor)."""
    name = "sequential"
    Settings = None
    rules = {}
    before_added = {}
    shardable = True

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg):
        """Problems of the method's settings taken with the run's (one line each), before any work."""
        return []

    def describe(self):
        cfg = self.cfg
        return f"MoELoRA E={cfg.experts} r={cfg.lora_r}"

    def add_adapter(self, model, n_stages):
        """Wrap the frozen base's language-model linears in the run's adapter and make it trainable; returns the
        wrapped names. Called once, before any stage, on a fresh and a resumed run alike (a resumed run then loads
        the last finished stage's weights into the same structure: build every stage's part now)."""
        cfg = self.cfg
        names = add_moelora(model, None, cfg.lora_r, cfg.lora_alpha, cfg.experts, cfg.lora_dropout)
        for _, p in adapter_parameters(model):
            p.requires_grad_(True)
        return names

    def start_stage(self, model, stage, records, state):
        """Before stage `stage` trains on `records`; the model holds the previous stage's weights (read from its
        checkpoint on a resumed run), `state` is what the previous stage's end_stage returned ({} before the first).
        Returns the records to train on. The loop trains the parameters that require a gradient after this hook."""
        return records

    def loss_term(self, model, inputs, logits, labels):
        """A term added to each micro-batch's loss (None: nothing), summed over its answer tokens as the cross-entropy
        is: the loop divides both by the global batch's answer-token count. logits (B, T, vocab), labels (B, T)."""
        return None

    def penalty(self, model):
        """A scalar added once per optimizer step, after the ranks' gradients are summed (None: nothing)."""
        return None

    def end_stage(self, model, stage, dataset, state):
        """After stage `stage` trained (on `dataset`): the tensors the later stages need ({name: tensor}; the loop
        saves them with the stage's checkpoint, checksummed, and hands them to the next start_stage, from disk on a
        resumed run). May rewrite the model's weights: the stage's checkpoint holds what the model holds after it."""
        return {}

    def evaluating(self, model, stage, state):
        """A context the loop evaluates stage `stage` in (after its end_stage; `state` what that returned): a method
        that evaluates other weights than it trains on (a merge), or routes at test time, sets that up on entry and
        undoes it on exit. What the context gives (`with ... as evaluation`) is None, or an object with a method
        task_done(task) -> {name: number}: the loop calls it on every rank after each task's answers are generated,
        the tasks in the same order on every rank, and records what it returns, numbers about that task's evaluation
        summed over the ranks (the whole test set's: a collective may sum them), in results.json's
        measured[<stage>][task] and the stage's summary line. It must not change the answers."""
        return contextlib.nullcontext()

    def notes(self, model):
        """Numbers about the stage that just trained, for its meta.json and the stage's summary line."""
        return {}


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


class Replay(Method):
    """Replay: each stage trains on its task's records plus a seeded sample of the earlier tasks' (replay_records).
    The sample is a function of (seed, stage): nothing to keep between stages, and it shards as sequential does."""
    name = "replay"

    @dataclasses.dataclass
    class Settings:
        replay_ratio: float = 0.1         # replay: earlier tasks' records added to each task, x its size (TRACE: 0.1)
    rules = {"replay_ratio": cli.at_least(0)}

    def start_stage(self, model, stage, records, state):
        replayed = replay_records(stage.train_sets, stage.earlier, len(records), self.cfg.replay_ratio, stage.seed,
                                  stage.index)
        self.replayed = len(replayed)
        return records + replayed

    def notes(self, model):
        return {"replayed": self.replayed}


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


class EWC(Method):
    """EWC: after each stage the diagonal empirical Fisher of the trainable weights on --ewc_samples of its records,
    summed over the stages so far (ewc_accumulate), is the state; the next stage adds ewc_penalty, pulling every weight
    to where the previous stage left it (its anchor, the weights the stage starts from)."""
    name = "ewc"
    shardable = False

    @dataclasses.dataclass
    class Settings:
        ewc_lambda: float = 0.1           # ewc: penalty weight (CoIN's 0.1 by a third-party reading; peers 0.5-1e4)
        ewc_samples: int = 1000           # ewc: records of each task its Fisher is estimated on (capped by its size)
    rules = {"ewc_lambda": cli.at_least(0), "ewc_samples": cli.at_least(1)}

    def start_stage(self, model, stage, records, state):
        self.named, self.anchor, self.fisher = trainable(model), None, state
        if stage.index > 0:  # the weights the stage starts from: the previous stage's
            self.anchor = {n: p.detach().clone() for n, p in self.named}
        return records

    def penalty(self, model):
        if self.anchor is None:
            return None
        return ewc_penalty(self.named, self.fisher, self.anchor, self.cfg.ewc_lambda)

    def end_stage(self, model, stage, dataset, state):
        """The Fisher summed over the stages so far; none after the last stage (no stage reads it). In eval mode: the
        Fisher of the trained model itself, and no random numbers drawn. Costs one forward and backward per record at
        batch 1, where a training step of 8 records costs one of each at batch 8 (bench/methods.py prints the ratio)."""
        if stage.last:
            return {}
        was_training = model.training
        model.eval()
        try:
            fisher = ewc_fisher(trainable(model), lambda i: stage.record_loss(dataset, i),
                                ewc_sample(len(dataset), self.cfg.ewc_samples, stage.seed, stage.index), stage.rank,
                                stage.world)
        finally:
            model.train(was_training)
        return ewc_accumulate(state or None, fisher)


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


class LwF(Method):
    """LwF: from the second stage on, each micro-batch's loss adds lwf_alpha * KD between the model and the previous
    stage's model (its trainable weights, copied at the stage's start) on the same inputs."""
    name = "lwf"
    shardable = False

    @dataclasses.dataclass
    class Settings:
        lwf_alpha: float = 0.1            # lwf: loss = CE + lwf_alpha * KD (CoIN's 0.1 by a third-party reading)
        lwf_temperature: float = 2.0      # lwf: distillation temperature T
    rules = {"lwf_alpha": cli.at_least(0), "lwf_temperature": cli.POSITIVE}

    def start_stage(self, model, stage, records, state):
        self.teacher = {n: p.detach().clone() for n, p in trainable(model)} if stage.index > 0 else None
        return records

    def loss_term(self, model, inputs, logits, labels):
        if self.teacher is None:
            return None
        old_logits = teacher_logits(model, self.teacher, inputs)  # (B, T, vocab), eval mode, no graph
        return self.cfg.lwf_alpha * lwf_distillation(logits, old_logits, labels, self.cfg.lwf_temperature)


# -----------------------------------------------------------------------------
# O-LoRA: orthogonal subspace learning (Wang et al. 2023, arXiv 2310.14152; official code github.com/cmnfriend/O-LoRA)

class OLoRALinear(AdapterLayer):
    """A frozen nn.Linear (self.base) plus one LoRA per task; the first `active` of them contribute, only the newest
    trains:

        y = W0 x + (alpha / r) * sum_{i=1..t} B_i A_i dropout(x)        A_i: (r, d_in), B_i: (d_out, r)

    Every task's LoRA is built at once (init_subspaces), so a checkpoint of any stage loads into the same structure;
    B_i = 0 until task i trains, so a subspace changes nothing before. State-dict keys <name>.lora_A.<i>,
    <name>.lora_B.<i>, i = 0..tasks-1. One dropout mask is shared by all subspaces, as the official layer's one
    nn.Dropout (src/peft/tuners/lora.py, forward), each record's from its seed and the layer's `key`
    (moelora.record_dropout)."""

    def __init__(self, base, r, alpha, dropout, tasks, key=0):
        super().__init__()
        assert isinstance(base, nn.Linear), f"OLoRALinear wraps an nn.Linear, got {type(base).__name__}"
        self.base = base.requires_grad_(False)
        self.r, self.scaling, self.dropout, self.active, self.key = r, alpha / r, dropout, 0, key
        d_in, d_out, device = base.in_features, base.out_features, base.weight.device
        self.lora_A = nn.ParameterList([nn.Parameter(torch.zeros(r, d_in, device=device)) for _ in range(tasks)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(d_out, r, device=device)) for _ in range(tasks)])

    def forward(self, x):  # x: (..., d_in)
        y = self.base(x)  # (..., d_out)
        if not self.active:
            return y
        h = x.to(self.lora_A[0].dtype)
        if self.training and self.dropout > 0:
            h = record_dropout(h, self.dropout, self.key, "OLoRALinear")
        A = torch.cat(list(self.lora_A)[:self.active])  # (t r, d_in): every active subspace in one product
        B = torch.cat(list(self.lora_B)[:self.active], dim=1)  # (d_out, t r)
        return y + ((h @ A.t()) @ B.t() * self.scaling).to(y.dtype)


def olora_layers(model):
    return [m for m in model.modules() if isinstance(m, OLoRALinear)]


def add_olora(model, names, r, alpha, dropout, tasks):
    """Wrap the nn.Linear layers `names` in OLoRALinear with `tasks` subspaces, none active yet (the model computes
    as the base until set_active)."""
    assert not olora_layers(model), "the model has O-LoRA layers already: add_olora runs once"
    return wrap_linears(model, names, lambda linear, key, name: OLoRALinear(linear, r, alpha, dropout, tasks, key))


def init_subspaces(model, seed, init):
    """Every task's A_t, B_t = 0. Task t's A_t in every layer is drawn from a generator seeded by (seed, t) alone,
    so it does not depend on the number of tasks. init: "kaiming" is PEFT's default, Kaiming-uniform with a = sqrt(5)
    (what the official code's new LoRA starts from: src/peft/tuners/lora.py, reset_lora_parameters); "normal" is
    N(0, 0.01^2), how coin's LoRA starts."""
    layers = olora_layers(model)
    for t in range(len(layers[0].lora_A) if layers else 0):
        g = seeded_generator(seed, "olora", t)
        for m in layers:
            A = torch.empty(m.lora_A[t].shape)
            if init == "kaiming":
                nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
            else:
                A = torch.randn(A.shape, generator=g) * 0.01
            with torch.no_grad():
                m.lora_A[t].copy_(A)
                m.lora_B[t].zero_()


def set_active(model, tasks):
    """The first `tasks` subspaces contribute; only the newest trains (its A_t and B_t), the earlier ones are frozen."""
    for m in olora_layers(model):
        m.active = tasks
        for i, (A, B) in enumerate(zip(m.lora_A, m.lora_B)):
            A.requires_grad_(i == tasks - 1)
            B.requires_grad_(i == tasks - 1)


def olora_orthogonality(model):
    """sum over adapted layers, over earlier tasks i < t, of sum_{j,k} |(A_t A_i^T)_{jk}|: A_t A_i^T is (r, r), zero
    when the rows of A_t (the directions task t reads) are orthogonal to task i's. A scalar tensor (0 at task 1).
    The official code's sum over its one matrix of the earlier tasks' rows is the same sum (uie_trainer_lora.py)."""
    terms = [(m.lora_A[m.active - 1] @ A_i.t()).abs().sum() for m in olora_layers(model)
             for A_i in list(m.lora_A)[:m.active - 1]]
    return sum(terms) if terms else torch.zeros(())


def olora_penalty(model, lambda1, lambda2, l2="norm"):
    """O-LoRA's regulariser of task t's subspace:

        lambda1 * olora_orthogonality(model)  +  lambda2 * sum_layers (||A_t||_F + ||B_t||_F)     (l2 = "norm")

    as the official code adds it (src/uie_trainer_lora.py, training_step: the element-wise absolute sum of A_i A_t^T
    and torch.norm(param, p=2) of the new A and B, not squared); l2 = "squared" sums ||A_t||^2 + ||B_t||^2, the
    paper's and TRACE's reading. lambda1 = 0.5, lambda2 = 0 are the official scripts' values. Only A_t, B_t get a
    gradient. coin adds it once per optimizer step to the per-answer-token cross-entropy (the official code adds it to
    each micro-batch's loss: the same at one micro-batch a step)."""
    total = lambda1 * olora_orthogonality(model)
    if lambda2:
        newest = [p for m in olora_layers(model) for p in (m.lora_A[m.active - 1], m.lora_B[m.active - 1])]
        total = total + lambda2 * sum(p.norm() if l2 == "norm" else p.pow(2).sum() for p in newest)
    return total


class OLoRA(Method):
    """O-LoRA: a LoRA per task in each adapted linear (OLoRALinear); stage t trains only its own, the earlier ones
    frozen and summed in, and its penalty keeps A_t's rows orthogonal to the earlier tasks' (olora_penalty). Its
    defaults are the official code's: q and v adapted, A Kaiming-uniform, the L2 term a sum of norms, nothing but
    the newest LoRA trains (docs/methods.md: each is a setting, and what the other choice does)."""
    name = "olora"
    shardable = False

    @dataclasses.dataclass
    class Settings:
        olora_lambda1: float = 0.5        # olora: weight of the orthogonality term (the official scripts: 0.5)
        olora_lambda2: float = 0.0        # olora: weight of the L2 term on the newest subspace (official: 0)
        olora_targets: str = "q_proj,v_proj"  # olora: the linears it adapts, name suffixes (official: q and v,
                                          # PEFT's default for Llama) | all (every linear of the language model)
        olora_init: str = "kaiming"       # olora: A_t's init: kaiming (PEFT's, as the official code) | normal
        olora_l2: str = "norm"            # olora: L2 term: norm (sum of Frobenius norms, the official code) | squared
        olora_projector: bool = False     # olora: the projector trains too (official: only the newest LoRA trains)
    rules = {"olora_lambda1": cli.at_least(0), "olora_lambda2": cli.at_least(0),
             "olora_targets": cli.Rule(bool, "'all' or comma-separated name suffixes (q_proj,v_proj)"),
             "olora_init": cli.one_of("kaiming", "normal"), "olora_l2": cli.one_of("norm", "squared")}
    # what O-LoRA runs did before these settings existed
    before_added = {"olora_targets": "all", "olora_init": "normal", "olora_l2": "squared", "olora_projector": True}

    @classmethod
    def check(cls, cfg):
        if cfg.experts != 1:
            return [f"--method=olora --experts={cfg.experts}: O-LoRA trains one plain LoRA per task; give --experts=1"]
        return []

    def describe(self):
        return f"O-LoRA r={self.cfg.lora_r} per task"

    def add_adapter(self, model, n_stages):
        cfg = self.cfg
        targets = None if cfg.olora_targets == "all" else cfg.olora_targets.split(",")
        names = add_olora(model, target_linears(model, targets), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                          n_stages)
        init_subspaces(model, cfg.seed, cfg.olora_init)
        return names

    def start_stage(self, model, stage, records, state):
        set_active(model, stage.index + 1)  # this task's subspace; the earlier ones are frozen from now on
        if not self.cfg.olora_projector:
            projector(model).requires_grad_(False)
        return records

    def penalty(self, model):
        if olora_layers(model)[0].active == 1 and not self.cfg.olora_lambda2:
            return None  # nothing to be orthogonal to yet
        return olora_penalty(model, self.cfg.olora_lambda1, self.cfg.olora_lambda2, self.cfg.olora_l2)

    def evaluating(self, model, stage, state):
        set_active(model, stage.index + 1)  # as after this stage's start (a resumed run may evaluate without it)
        return contextlib.nullcontext()

    def notes(self, model):
        return {"orthogonality": olora_orthogonality(model).item()}  # sum |A_t A_i^T|, before lambda1


# -----------------------------------------------------------------------------
# The registry: --method's choices

METHODS = {}


def register(cls):
    """Make the Method subclass `cls` a choice of --method (its name); usable as a class decorator. Its Settings join
    coin.py's settings when a command line is parsed (coin.run_settings)."""
    assert issubclass(cls, Method) and cls.name not in METHODS, f"{cls.name!r}: not a new Method subclass"
    METHODS[cls.name] = cls
    return cls


for _cls in (Method, Replay, EWC, LwF, OLoRA):
    register(_cls)


# -----------------------------------------------------------------------------
# RegLoRA (SEFE: Chen et al., ICML 2025, arXiv 2505.02486; official code github.com/jinpeng0528/SEFE, read at 2f61efe)

class MergedLoRALinear(AdapterLayer):
    """A frozen nn.Linear (self.base), the LoRAs of the finished stages merged, and this stage's fresh LoRA, which
    alone trains:

        y = W0 x + (alpha / r) * (B_m A_m x + B A dropout(x))        A_m = [A_1; ...; A_j]: (j r, d_in)
                                                                     B_m = [B_1 ... B_j]:   (d_out, j r)

    B_m A_m = sum_i B_i A_i, so the first term is every finished stage's (alpha / r) B_i A_i added into W0, as the
    official code merges each stage's LoRA into the weights (scripts/merge_lora_weights.py). The merged delta is kept
    as its factors, in fp32, outside W0: nothing is rounded into W0's dtype, the frozen base is never rewritten, and a
    resumed run rebuilds it bit for bit from the method's state (set_merged). Factors are the smaller form while
    j r < d_in d_out / (d_in + d_out) (7B at r 128: up to 16 stages). The fresh LoRA's keys are <name>.lora_A and
    <name>.lora_B; the merged factors are buffers outside the state dict. No dropout on the merged part: it is part
    of the weights; the fresh LoRA's is each record's from its seed and the layer's `key` (moelora.record_dropout)."""

    def __init__(self, base, r, alpha, dropout, key=0):
        super().__init__()
        assert isinstance(base, nn.Linear), f"MergedLoRALinear wraps an nn.Linear, got {type(base).__name__}"
        self.base = base.requires_grad_(False)
        self.scaling, self.dropout, self.key = alpha / r, dropout, key
        d_in, d_out, device = base.in_features, base.out_features, base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, d_in, device=device))  # (r, d_in): set by fresh_lora
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=device))  # (d_out, r)
        self.register_buffer("merged_A", torch.zeros(0, d_in, device=device), persistent=False)  # (j r, d_in)
        self.register_buffer("merged_B", torch.zeros(d_out, 0, device=device), persistent=False)  # (d_out, j r)

    def forward(self, x):  # x: (..., d_in)
        y = self.base(x)  # (..., d_out)
        h = x.to(self.lora_A.dtype)
        out = (h @ self.merged_A.t()) @ self.merged_B.t() if len(self.merged_A) else 0  # (..., d_out)
        if self.training and self.dropout > 0:
            h = record_dropout(h, self.dropout, self.key, "MergedLoRALinear")
        out = out + (h @ self.lora_A.t()) @ self.lora_B.t()  # (..., d_out)
        return y + (out * self.scaling).to(y.dtype)

    @torch.no_grad()
    def fold(self):
        """Merge the trained LoRA: its factors join the merged ones and B becomes 0, so the layer computes the same."""
        self.merged_A = torch.cat([self.merged_A, self.lora_A.detach()])
        self.merged_B = torch.cat([self.merged_B, self.lora_B.detach()], dim=1)
        self.lora_B.zero_()


def merged_lora_layers(model):
    """[(name, MergedLoRALinear)] in the model's order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MergedLoRALinear)]


def add_merged_lora(model, names, r, alpha, dropout):
    """Wrap the nn.Linear layers `names` in MergedLoRALinear (nothing merged yet, a zero LoRA: the base's output)."""
    assert not merged_lora_layers(model), "the model has MergedLoRALinear layers already: add_merged_lora runs once"
    return wrap_linears(model, names, lambda linear, key, name: MergedLoRALinear(linear, r, alpha, dropout, key))


def fresh_lora(model, seed, stage, init):
    """A new LoRA for stage `stage` in every layer: B = 0, A drawn from a generator seeded by (seed, stage) alone, layer
    after layer. init: "kaiming" is PEFT's Kaiming-uniform with a = sqrt(5), what the official code's get_peft_model
    gives every stage; "normal" is N(0, 0.01^2), coin's LoRA."""
    g = seeded_generator(seed, "reglora", stage)
    for _, m in merged_lora_layers(model):
        A = torch.empty(m.lora_A.shape)
        if init == "kaiming":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=g)
        else:
            A = torch.randn(A.shape, generator=g) * 0.01
        with torch.no_grad():
            m.lora_A.copy_(A)
            m.lora_B.zero_()


def key_elements(delta, ratio):
    """The key elements of a stage's LoRA in one linear: the flat positions (row * d_in + column) of the
    k = int(ratio * d_out * d_in) entries of largest |delta|, delta = B A (d_out, d_in) without alpha / r, largest
    first, as key_elements_identification.py (lines 50-60) finds them (it keeps (row, column) pairs). int32 where the
    positions fit (a 7B linear's do): half the memory of the official int64 pairs' quarter."""
    k = int(ratio * delta.shape[0] * delta.shape[1])
    flat = torch.topk(delta.abs().flatten(), k).indices  # (k,)
    return flat.to(torch.int32) if delta.numel() < 2 ** 31 else flat


def join_keys(earlier, new, union="concat"):
    """A stage's key elements joined with the earlier stages': "concat" appends them (new first, as the official
    torch.cat((new, legacy)), key_elements_identification.py line 67), so a position that is a key again counts once
    more in the penalty's mean; "set" keeps each position once."""
    if earlier is None:
        return new
    joined = torch.cat([new, earlier])
    return joined if union == "concat" else torch.unique(joined)


def reglora_penalty(layers, keys, lam):
    """RegLoRA's regulariser of the stage's fresh LoRA at the earlier stages' key elements:

        lam * (1 / N) * sum over the N adapted linears of mean_{p in keys} |(B A)_p|

    B A without alpha / r, as the official penalty (llava/model/language_model/modeling_llama.py, lines 791-801: the
    mean per linear, summed; line 1131: / 224; llava_llama.py line 114: x 2.5e3). N is coin's count of adapted linears
    where the official code hard-codes 224 = 32 layers x 7 (the same at 7B with every linear adapted). A linear without
    keys adds 0 (the official code's mean would be NaN; only a linear of fewer than 1 / ratio entries has none). layers:
    [(name, MergedLoRALinear)], keys: {name: flat positions}. A scalar; only the fresh LoRAs get a gradient."""
    total = 0.0
    for name, m in layers:
        if len(keys[name]):
            total = total + (m.lora_B @ m.lora_A).flatten().index_select(0, keys[name]).abs().mean()
    return total / len(layers) * lam


class RegLoRA(Method):
    """RegLoRA: each stage trains a fresh LoRA (r, alpha from --lora_r, --lora_alpha; official 128, 256) on the model
    with every earlier stage's LoRA merged in (MergedLoRALinear); after the stage, the key elements of each adapted
    linear, the top --reglora_ratio of |B A|, join the earlier stages' (join_keys), and the LoRA is merged; while a
    later stage trains, the loss adds reglora_penalty once per optimizer step. The end-of-stage state holds, per
    linear, the merged factors and the key elements; the projector trains and carries over as in sequential tuning
    (the official code trains it too, unregularised). Defaults are the official code's (docs/methods.md)."""
    name = "reglora"
    shardable = False

    @dataclasses.dataclass
    class Settings:
        reglora_lambda: float = 2.5e3     # reglora: penalty weight (official: loss = CE + 2.5e3 * penalty)
        reglora_ratio: float = 0.02       # reglora: share of each linear's entries kept as key elements (official 2%)
        reglora_union: str = "concat"     # reglora: a stage's keys join the earlier ones by concat (official: a key
                                          # found again counts again in the mean) | set (each position once)
        reglora_init: str = "kaiming"     # reglora: each fresh LoRA's A: kaiming (PEFT's, the official) | normal
    rules = {"reglora_lambda": cli.at_least(0), "reglora_ratio": cli.between(0, 1, low_open=True),
             "reglora_union": cli.one_of("concat", "set"), "reglora_init": cli.one_of("kaiming", "normal")}

    @classmethod
    def check(cls, cfg):
        if cfg.experts != 1:
            return [f"--method=reglora --experts={cfg.experts}: RegLoRA trains and merges one plain LoRA per stage; "
                    "give --experts=1"]
        return []

    def describe(self):
        return f"RegLoRA r={self.cfg.lora_r}, a fresh LoRA per stage, merged after it"

    def add_adapter(self, model, n_stages):
        cfg = self.cfg
        names = add_merged_lora(model, target_linears(model), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        for _, m in merged_lora_layers(model):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
        return names

    def load_state(self, model, state):
        """The merged factors of the stages so far into the layers, and their key elements; {} before any stage."""
        self.keys = {}
        for name, m in merged_lora_layers(model):
            if f"{name}.merged_A" in state:
                m.merged_A = state[f"{name}.merged_A"].to(m.lora_A.device)
                m.merged_B = state[f"{name}.merged_B"].to(m.lora_A.device)
            if f"{name}.keys" in state:
                self.keys[name] = state[f"{name}.keys"].to(m.lora_A.device)

    def start_stage(self, model, stage, records, state):
        self.load_state(model, state)  # the model holds the earlier stages' LoRAs merged: on a resumed run too
        fresh_lora(model, stage.seed, stage.index, self.cfg.reglora_init)
        return records

    def penalty(self, model):
        if not self.keys:
            return None  # the first stage: nothing to keep yet
        return reglora_penalty(merged_lora_layers(model), self.keys, self.cfg.reglora_lambda)

    def end_stage(self, model, stage, dataset, state):
        """Key elements from B A in fp32 (none after the last stage: no stage reads them), then the merge."""
        cfg, state = self.cfg, {}
        with torch.no_grad():
            for name, m in merged_lora_layers(model):
                if not stage.last:
                    new = key_elements(m.lora_B.float() @ m.lora_A.float(), cfg.reglora_ratio)
                    state[f"{name}.keys"] = join_keys(self.keys.get(name), new, cfg.reglora_union)
                m.fold()
                state[f"{name}.merged_A"], state[f"{name}.merged_B"] = m.merged_A, m.merged_B
        return state

    def evaluating(self, model, stage, state):
        self.load_state(model, state)  # as after this stage's end (a resumed run may evaluate without it)
        return contextlib.nullcontext()

    def notes(self, model):
        if not self.keys:
            return {}
        return {"key_elements": sum(len(k) for k in self.keys.values())}  # in the penalty this stage, repeats counted


# -----------------------------------------------------------------------------
# Merging task vectors: MagMax (Marczak et al., ECCV 2024, arXiv 2407.06322; official code
# github.com/danielm1405/magmax, read at 4f49f18) and the plain mean of task vectors

def max_magnitude(task_vectors):
    """Per entry, the task vector of largest magnitude over `task_vectors` (an iterable of same-shaped tensors, in
    stage order), as src/merging/task_vectors.py's merge_max_abs (lines 104-127): a running torch.where with >=, so on
    an exact tie of |tau| the later stage's entry is kept. (src/merging/ties.py's "magnitude" aggregate, an argmax
    that keeps the first, is used by no script.) Two dense tensors at a time, whatever the number of stages."""
    merged = None
    for tau in task_vectors:
        merged = tau if merged is None else torch.where(tau.abs() >= merged.abs(), tau, merged)
    return merged


def summed(task_vectors):
    """The sum of `task_vectors`, in stage order (the official `sum(task_vectors)`, TaskVector.__add__)."""
    total = None
    for tau in task_vectors:
        total = tau if total is None else total + tau
    return total


@contextlib.contextmanager
def task_vector_merge(model, state, stages, merge, coefficient):
    """Inside, the model is theta_0 + coefficient * merge(tau_1, ..., tau_stages), as the official apply_to
    (src/merging/task_vectors.py, lines 73-85: pretrained + scaling_coef * vector); on exit it is as before, bit for
    bit. The task vectors are theta_i - theta_0, theta_0 the base (no adapter, the base's projector):
      - each adapted linear's, the LoRA's delta-W (alpha / r) B_i A_i of stage i, computed exactly in fp32 from the
        factors in `state` ("<i>.<layer>.lora_A", "<i>.<layer>.lora_B"), one linear at a time (a 7B model's dense
        deltas would not fit at once); the merged weight is written into the base linear's weight in its dtype (its
        own value saved to the CPU, restored on exit), and the linear stands in for its adapter layer;
      - the projector's, its weights after stage i less the base's ("<i>.projector.<k>", "base.projector.<k>").
    NOTE(fidelity): the official task vectors are differences of whole fp32 state dicts (full fine-tuning of CLIP);
    here the language model is adapted by a LoRA, whose delta-W is exactly its product, and the merged weights round
    to the base's dtype (exact at fp32; bf16 at 7B, as the base's own weights)."""
    saved, swapped = [], []
    try:
        with torch.no_grad():
            for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]:
                w = m.base.weight
                taus = (m.scaling * (state[f"{i}.{name}.lora_B"].to(w.device).float()
                                     @ state[f"{i}.{name}.lora_A"].to(w.device).float()) for i in range(stages))
                merged = w.float() + coefficient * merge(taus)  # (d_out, d_in)
                saved.append((w, w.detach().to("cpu", copy=True)))
                w.copy_(merged)
                parent, _, child = name.rpartition(".")
                swapped.append((model.get_submodule(parent), child, m))
                setattr(model.get_submodule(parent), child, m.base)
            for k, p in projector(model).named_parameters():
                base = state[f"base.projector.{k}"].to(p.device)
                taus = (state[f"{i}.projector.{k}"].to(p.device) - base for i in range(stages))
                merged = base + coefficient * merge(taus)
                saved.append((p, p.detach().to("cpu", copy=True)))
                p.copy_(merged)
        yield
    finally:
        with torch.no_grad():
            for parent, child, m in swapped:
                setattr(parent, child, m)
            for p, value in saved:
                p.copy_(value)


class MagMax(Method):
    """MagMax: sequential fine-tuning of a LoRA (--experts=1) and the projector, exactly as --method=sequential
    trains; the model evaluated after stage j is theta_0 + magmax_lambda * (per entry, the task vector of largest
    magnitude over stages 1..j) (task_vector_merge, max_magnitude), while training goes on from stage j's own weights.
    The end-of-stage state keeps every stage's LoRA factors and projector (and the base's projector): the task
    vectors are rebuilt from them, one linear at a time, exactly."""
    name = "magmax"
    shardable = False

    @dataclasses.dataclass
    class Settings:
        magmax_lambda: float = 0.5        # magmax: the merged task vector's scaling (official: 0.5)
    rules = {"magmax_lambda": cli.at_least(0)}

    @classmethod
    def check(cls, cfg):
        if cfg.experts != 1:
            return [f"--method={cls.name} --experts={cfg.experts}: merging needs each stage's delta-W, which a "
                    "token-routed MoELoRA has not; give --experts=1"]
        return []

    def describe(self):
        return f"LoRA r={self.cfg.lora_r}, evaluated as {self.name} merges its task vectors"

    def merge(self, task_vectors):
        return max_magnitude(task_vectors)

    def coefficient(self, stages):
        return self.cfg.magmax_lambda

    def start_stage(self, model, stage, records, state):
        if stage.index == 0:  # theta_0's projector, before it trains (kept in the state from the first stage's end)
            self.base_projector = {k: p.detach().to("cpu", copy=True) for k, p in projector(model).named_parameters()}
        return records

    def end_stage(self, model, stage, dataset, state):
        """The earlier stages' state, plus this stage's LoRA factors and projector (the base's projector once)."""
        j, state = stage.index, dict(state)
        if j == 0:
            state.update({f"base.projector.{k}": v for k, v in self.base_projector.items()})
        state.update({f"{j}.{n}": p.detach().to("cpu", copy=True) for n, p in adapter_parameters(model)})
        state.update({f"{j}.projector.{k}": p.detach().to("cpu", copy=True)
                      for k, p in projector(model).named_parameters()})
        return state

    def evaluating(self, model, stage, state):
        return task_vector_merge(model, state, stage.index + 1, self.merge, self.coefficient(stage.index + 1))


class MeanMerge(MagMax):
    """The plain mean of task vectors: the model evaluated after stage j is theta_0 + merge_lambda * (1/j) *
    sum_{i <= j} tau_i (the official merging baseline: sum with scaling_coef 1 / n, merge_splitted.py line 71);
    trained and kept as MagMax."""
    name = "merge_mean"

    @dataclasses.dataclass
    class Settings:
        merge_lambda: float = 1.0         # merge_mean: the mean task vector's scaling (official: 1, on the mean)
    rules = {"merge_lambda": cli.at_least(0)}

    def merge(self, task_vectors):
        return summed(task_vectors)

    def coefficient(self, stages):
        return self.cfg.merge_lambda / stages  # the official 1.0 / n_splits at merge_lambda 1


for _cls in (RegLoRA, MagMax, MeanMerge):
    register(_cls)


# -----------------------------------------------------------------------------
# Routing by CLIP features at test time, one LoRA expert per task: HiDe-LLaVA (Guo et al., ACL 2025, arXiv 2503.12941;
# official code github.com/Ghy0501/HiDe-LLaVA) and DISCO (MCITlib, github.com/Ghy0501/MCITlib, DISCO/). Neither is told
# the task at test time: both weigh the tasks' experts by how close the input's frozen CLIP features are to each task's
# features kept from its training records. The file and line references are to the official code at the commits
# HiDe-LLaVA 4dd0793 and MCITlib 2956dfd (docs/methods.md lists every difference and why).

class TaskExpertLinear(AdapterLayer):
    """A frozen nn.Linear (self.base) plus one LoRA expert per task, A_i: (k, d_in), B_i: (d_out, k), k = r/E, scaled
    by s = alpha / r (the total rank, as the official layers' lora_alpha / r with r split over expert_num):

        training, stage j         y = W0 x + s B_j A_j dropout(x)                 only expert j trains
        evaluation, rule "sum"    y = W0 x + s (sum_{i<t} B_i) (sum_{i<t} A_i) x   t = tasks trained so far
        evaluation, "weighted"    y = W0 x + s sum_{i<t} w_i B_i A_i x             w (B, t): each record's weights

    "sum" is HiDe-LLaVA's rule below its top layer: the A's and the B's are summed separately, so the cross terms
    B_i A_j (i != j) count too (HiDe/peft/tuners/clitmoelora.py, HiDeMOELinearA.forward lines 462-476 and
    HiDeMOELinearB.forward 514-528). "weighted" is HiDe-LLaVA's top layer (HiDeMOELoraLinear.forward, lines 416-424)
    and every DISCO layer (DISCO/CoIN/peft/tuners/clitmoelora.py lines 400-420: B diag(w_1 I, ..., w_E I) A x, the
    block-diagonal product, is this sum). `weights` is set by the router (TestTimeRouter) before each batch.
    State-dict keys <name>.lora_A.<i>, <name>.lora_B.<i>, i = 0..E-1: every expert is built at once, so any stage's
    checkpoint loads into the same structure; B_i = 0 until task i trains. Training's dropout mask is each record's,
    from its seed and the layer's `key` (moelora.record_dropout)."""

    def __init__(self, base, r, alpha, experts, dropout, rule, key=0):
        super().__init__()
        assert isinstance(base, nn.Linear), f"TaskExpertLinear wraps an nn.Linear, got {type(base).__name__}"
        assert r % experts == 0 and rule in ("sum", "weighted"), (r, experts, rule)
        self.base = base.requires_grad_(False)
        self.rank, self.scaling, self.dropout, self.rule, self.key = r // experts, alpha / r, dropout, rule, key
        self.task, self.seen, self.weights = 0, 0, None  # training's expert; experts evaluated; (B, seen) or None
        d_in, d_out, device = base.in_features, base.out_features, base.weight.device
        self.lora_A = nn.ParameterList([nn.Parameter(torch.zeros(self.rank, d_in, device=device))
                                        for _ in range(experts)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(d_out, self.rank, device=device))
                                        for _ in range(experts)])

    def forward(self, x):  # x: (B, T, d_in)
        y = self.base(x)  # (B, T, d_out)
        h = x.to(self.lora_A[0].dtype)
        if self.training:  # the stage's own expert alone (clitmoelora.py lines 407-410)
            if self.dropout > 0:
                h = record_dropout(h, self.dropout, self.key, "TaskExpertLinear")
            delta = (h @ self.lora_A[self.task].t()) @ self.lora_B[self.task].t()  # (B, T, d_out)
        elif not self.seen:  # evaluated before any task trained: the base
            return y
        elif self.rule == "sum":
            A = torch.stack(list(self.lora_A)[:self.seen]).sum(0)  # (k, d_in): sum_i A_i
            B = torch.stack(list(self.lora_B)[:self.seen]).sum(0)  # (d_out, k): sum_i B_i
            delta = (h @ A.t()) @ B.t()
        else:
            w = self.weights
            assert w is not None and w.shape == (x.shape[0], self.seen), \
                f"router weights {None if w is None else tuple(w.shape)} for a batch of {x.shape[0]} records and " \
                f"{self.seen} experts: evaluate inside the method's evaluating() context"
            A = torch.cat(list(self.lora_A)[:self.seen])  # (t k, d_in): every expert's A_i in one product
            B = torch.cat(list(self.lora_B)[:self.seen], dim=1)  # (d_out, t k)
            z = (h @ A.t()).unflatten(-1, (self.seen, self.rank))  # (B, T, t, k)
            z = z * w.view(w.shape[0], *[1] * (z.dim() - 3), self.seen, 1).to(z.dtype)  # expert i's part times w_i
            delta = z.flatten(-2) @ B.t()  # (B, T, d_out)
        return y + (delta * self.scaling).to(y.dtype)


def task_expert_layers(model):
    return [m for m in model.modules() if isinstance(m, TaskExpertLinear)]


def layer_index(name):
    """The decoder layer of an adapted linear's name (model.language_model.layers.31.mlp.down_proj -> 31)."""
    found = re.search(r"\.layers\.(\d+)\.", f".{name}")
    assert found, f"{name}: no .layers.<i>. in the name"
    return int(found.group(1))


def add_task_experts(model, r, alpha, experts, dropout, weighted_layers, seed, method):
    """Wrap every linear of the language model (as the official find_all_linear_names: not lm_head, the vision tower or
    the projector) in TaskExpertLinear with `experts` experts; the rule "weighted" in the decoder layers
    `weighted_layers` (a function of the number of layers -> the set of their indices), "sum" elsewhere. A_i ~ N(0,
    0.01^2) and B_i = 0 (the official reset_lora_parameters, clitmoelora.py lines 297-302), expert i's A drawn from a
    generator seeded by (seed, method, i) alone. Returns the wrapped names."""
    assert not task_expert_layers(model), "the model has task experts already: add_task_experts runs once"
    names = target_linears(model)
    weighted = weighted_layers(max(layer_index(n) for n in names) + 1)
    wrap_linears(model, names, lambda linear, key, name: TaskExpertLinear(
        linear, r, alpha, experts, dropout, "weighted" if layer_index(name) in weighted else "sum", key))
    layers = task_expert_layers(model)
    for i in range(experts):
        g = seeded_generator(seed, method, f"expert{i}")
        for m in layers:
            with torch.no_grad():
                m.lora_A[i].copy_(torch.randn(m.lora_A[i].shape, generator=g) * 0.01)
    return names


def train_expert(model, task):
    """Stage `task` trains expert `task` alone; the other experts are frozen."""
    for m in task_expert_layers(model):
        m.task = task
        for i, (A, B) in enumerate(zip(m.lora_A, m.lora_B)):
            A.requires_grad_(i == task)
            B.requires_grad_(i == task)


# --- the router's features: frozen, computed without a graph, outside the trained model

def instruction_texts(tokenizer, input_ids, attention_mask):
    """Each prompt's instruction: its attended tokens (any padding side) decoded without special tokens (the image
    token, BOS, padding), then the text between the first "USER:" and the last "ASSISTANT:". For a prompt with an
    image this is the text the official router reads (HiDe-LLaVA llava/model/llava_arch.py lines 165-168, DISCO's
    lines 160-163: the decoded prompt, its first line dropped, cut at " ASSISTANT"): the question with its
    instruction template, without the system prompt."""
    texts = []
    for ids, mask in zip(input_ids, attention_mask):
        text = tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        user, assistant = text.find("USER:"), text.rfind("ASSISTANT:")
        assert 0 <= user < assistant, f"not a LLaVA-1.5 (Vicuna v1) prompt: {text[:100]!r}"
        texts.append(text[user + len("USER:"):assistant].strip())
    return texts


class EmbeddingText:
    """CoIN-mini's stand-in for CLIP's text tower (the tiny base has none): the mean of the frozen language model's
    input embeddings of the instruction's tokens (the base's tokenizer, no special tokens). Zeros for an empty text."""

    def __init__(self, model, tokenizer):
        self.embed, self.tokenizer = model.get_input_embeddings(), tokenizer

    def __call__(self, texts):  # -> (B, d_model) float32
        rows = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            weight = self.embed.weight
            rows.append(weight[torch.tensor(ids, device=weight.device)].float().mean(0) if ids else
                        torch.zeros(weight.shape[1], device=weight.device))
        return torch.stack(rows)


class ClipText:
    """CLIP's text tower, as the official router reads it: CLIPTextModel's pooler_output (the last layer-normed state
    at the end-of-text token) of the instruction, tokenised by CLIP's tokenizer with the longest padding, truncated at
    77 tokens (llava_arch.py lines 170-179; llava/model/multimodal_encoder/clip_encoder.py, CLIPTextTower.forward lines
    115-123). Only the text model is loaded from the CLIP folder, frozen, in eval mode; it is not part of the trained
    model (no optimizer, no checkpoint sees it)."""

    def __init__(self, folder, device, dtype):
        from transformers import AutoTokenizer, CLIPTextModel
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = CLIPTextModel.from_pretrained(folder, dtype=dtype).to(device).eval().requires_grad_(False)

    def __call__(self, texts):  # -> (B, hidden) float32
        enc = self.tokenizer(texts, padding="longest", max_length=77, truncation=True, return_tensors="pt")
        enc = {k: enc[k].to(self.model.device) for k in ("input_ids", "attention_mask")}
        return self.model(**enc).pooler_output.float()


def visual_projection(folder):
    """CLIP's visual_projection.weight (projection_dim, hidden) from the CLIP folder's weights, read alone: the
    base's vision tower is CLIP's vision model, and its pooled output times this is CLIPVisionModelWithProjection's
    image_embeds, the official image feature (clip_encoder.py line 51)."""
    import os
    path = os.path.join(folder, "model.safetensors")
    if os.path.exists(path):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            if "visual_projection.weight" in f.keys():
                return f.get_tensor("visual_projection.weight")
    elif os.path.exists(os.path.join(folder, "pytorch_model.bin")):
        sd = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True, mmap=True)
        if "visual_projection.weight" in sd:
            return sd["visual_projection.weight"].clone()
    raise cli.UserError(f"{folder}: no visual_projection.weight in model.safetensors or pytorch_model.bin; give the "
                        "whole CLIP folder (openai/clip-vit-large-patch14-336), the one `coin.py assemble --clip` read")


class RouterFeatures:
    """What the router compares, per record, all frozen and without a graph: the image's feature, the pooled output of
    the base's vision tower (CLIP's CLS state after its last layer norm), times CLIP's visual projection when `clip`
    names the CLIP folder (then it is CLIP's image_embeds, the official feature); and the instruction's feature,
    ClipText with `clip`, else the EmbeddingText stand-in."""

    def __init__(self, model, tokenizer, clip=""):
        self.tokenizer, self.image_token = tokenizer, model.config.image_token_index
        self.vision = vision_tower(model)
        device = self.vision.device
        self.projection = visual_projection(clip).float().to(device) if clip else None
        self.text = ClipText(clip, device, model.dtype) if clip else EmbeddingText(model, tokenizer)
        self.image_dim = self.vision.config.hidden_size if self.projection is None else self.projection.shape[0]

    def has_image(self, input_ids):  # (B, T) -> (B,) bool
        return (input_ids == self.image_token).any(1)

    def image(self, pooled, has_image):
        """(B, image_dim) float32: the records' image features (zeros for a record without an image) from the vision
        tower's pooled output of the batch's images, in order (n_images, hidden)."""
        out = torch.zeros(len(has_image), self.image_dim, device=has_image.device)
        if pooled is not None:
            assert len(pooled) == int(has_image.sum()), f"{len(pooled)} images for {int(has_image.sum())} records"
            pooled = pooled.float()
            out[has_image] = pooled if self.projection is None else pooled @ self.projection.t()
        return out

    def instruction(self, input_ids, attention_mask):  # -> (B, text_dim) float32
        return self.text(instruction_texts(self.tokenizer, input_ids, attention_mask))


def vision_tower(model):
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    if tower is None:
        raise cli.UserError(f"{type(model).__name__}: no model.vision_tower; the CLIP-feature routers need a LLaVA")
    return tower


@torch.no_grad()
def record_features(features, processor, records, image_dir, chunk, rank=0, world=1):
    """(image (n, image_dim), has_image (n,), instruction (n, text_dim)) of training `records`, on the CPU: each
    prompt as evaluation writes it (no answer) and its image as training sees it, padded to a square (the official
    anchors are taken from training batches). Chunks of `chunk` records, dealt to the ranks in turn and gathered in
    record order: the same features whatever the number of ranks. The model is only read (the vision tower and the
    embeddings, frozen, no dropout): no random number is drawn."""
    device, mean, pad_id = features.vision.device, data.image_mean_rgb(processor), processor.tokenizer.pad_token_id
    parts = {}
    for c in range(rank, math.ceil(len(records) / chunk), world):
        items = []
        for ex in records[c * chunk:(c + 1) * chunk]:
            image = None if ex["image"] is None else data.expand2square(
                data.load_image(image_dir, ex["image"], ex["id"]), mean)
            items.append(data.encode(processor, data.build_prompt(ex["question"], image is not None, processor), image))
        enc = data.collate(items, pad_id, left=True)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        pooled = None
        if enc.get("pixel_values") is not None:
            pooled = features.vision(pixel_values=enc["pixel_values"].to(device, features.vision.dtype)).pooler_output
        has = features.has_image(ids)
        parts[c] = (features.image(pooled, has).cpu(), has.cpu(), features.instruction(ids, mask).cpu())
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, parts)
        parts = {c: p for part in gathered for c, p in part.items()}
    image, has, text = (torch.cat([parts[c][k] for c in sorted(parts)]) for k in range(3))
    return image, has, text


def mean_feature(rows):
    """The mean of `rows` (n, d), summed in float64; zeros when n = 0 (a task without images: cosine 0 to it)."""
    if not len(rows):
        return torch.zeros(rows.shape[1])
    return (rows.double().sum(0) / len(rows)).float()


def official_running_anchor(rows, chunk, generator):
    """HiDe-LLaVA's anchor as its code computes it (llava_arch.py lines 187-194, llava_llama.py lines 58-71): starting
    from a random 0.1 N(0, 1) vector counted as one sample, with a bf16 counter, the running mean over successive
    chunks of `chunk` rows (its training micro-batches):

        anchor <- (anchor * count + sum(chunk)) / (count + n),    count in bf16 (exact to 256; stuck at 8192 for 16)

    --hide_anchor=official; the default is the mean of the records' features (mean_feature), the paper's."""
    anchor = 0.1 * torch.randn(rows.shape[1], generator=generator)
    count = torch.ones(1, dtype=torch.bfloat16)
    for s in range(0, len(rows), chunk):
        part = rows[s:s + chunk]
        total = anchor * count + part.sum(0)
        count += part.shape[0]
        anchor = total / count
    return anchor.float()


# --- the routers: each record's expert weights from its features and the tasks' kept features

def hide_router(image, has_image, text, image_anchors, text_anchors, temperature=0.1, over="record"):
    """HiDe-LLaVA's expert weights (B, t) over the t tasks trained so far (llava_arch.py lines 196-215):

        w = softmax_i( (cos(image, image_anchor_i) + cos(text, text_anchor_i)) / 2 / temperature )

    over="record": each record its own weights (a record without an image: its text cosine alone), the paper's rule and
    what the official evaluation computes (it generates one record at a time). over="batch": the official code at a
    batch: per task the largest image cosine and the largest text cosine over the batch's records, one weight vector
    for all of them (--hide_router=batch). image (B, d_i), has_image (B,), text (B, d_t), anchors (t, d)."""
    cos_image = F.cosine_similarity(image.unsqueeze(1), image_anchors.unsqueeze(0), dim=2)  # (B, t)
    cos_text = F.cosine_similarity(text.unsqueeze(1), text_anchors.unsqueeze(0), dim=2)  # (B, t)
    # NOTE(fidelity): per record by default; the official code takes the max over the batch (over="batch"), the
    # same at its evaluation's batch of 1
    if over == "batch":
        best_text = cos_text.max(0).values  # (t,)
        score = (cos_image[has_image].max(0).values + best_text) / 2 if has_image.any() else best_text
        return F.softmax(score / temperature, dim=0).expand(len(text), -1)
    # NOTE(fidelity): a record without an image is routed by its text alone; the official evaluation does not route
    # it (no images: an early return, llava_arch.py line 138), so the previous record's weights stay
    score = torch.where(has_image.unsqueeze(1), (cos_image + cos_text) / 2, cos_text)  # (B, t)
    return F.softmax(score / temperature, dim=1)


def disco_router(text, prototypes, temperature=0.05, over="record"):
    """DISCO's expert weights (B, t) over the t tasks trained so far (DISCO/llava/model/llava_arch.py lines 175-182):

        w = softmax_i( cos(text, prototype_i) / temperature )          the text feature alone

    over="record": each record its own weights (what the official evaluation, one record at a time, computes);
    over="batch": the official code at a batch, the cosine of the batch's mean text feature (--disco_router=batch).
    text (B, d), prototypes (t, d)."""
    query = text.mean(0, keepdim=True) if over == "batch" else text  # (B or 1, d)
    cos = F.cosine_similarity(query.unsqueeze(1), prototypes.unsqueeze(0), dim=2)  # (B or 1, t)
    return F.softmax(cos / temperature, dim=1).expand(len(text), -1)


class TestTimeRouter:
    """A context in which every forward of the model routes: before the language model runs on a new prompt, the
    records' expert weights are computed from their own inputs and set on the weighted layers, where they stay for
    the decoding steps that follow (the KV cache's: the official code too routes at the prompt and returns early for
    one-token inputs, llava_arch.py line 138). Three hooks, so that it works whether the vision tower runs inside the
    forward (a plain call) or before it (transformers' generate encodes the images first):
      - the model's forward pre-hook takes a prompt's input_ids and attention_mask (a prompt: no cache, or an empty
        one); the padding side does not matter, each record's tokens are read through its attention mask;
      - the vision tower's forward hook keeps its pooled output (images of the records that have one, in order);
      - the language model's forward pre-hook, which runs after both, computes the weights once for the prompt.
    weigh(image (B, d_i), has_image (B,), text (B, d_t)) -> (B, t), over `tasks` (the tasks trained so far, in expert
    order). `routed` collects each prompt's records' largest weight's expert ((B,) a prompt) until task_done, which
    the loop calls on each of the `world` ranks after a task's answers (Method.evaluating)."""

    def __init__(self, model, features, weigh, layers, tasks, world=1):
        self.model, self.features, self.weigh, self.layers = model, features, weigh, layers
        self.tasks, self.world = tasks, world
        self.prompt, self.pooled, self.routed, self.hooks = None, None, [], []

    def __enter__(self):
        language_model = self.model.model.language_model
        self.hooks = [self.model.register_forward_pre_hook(self.take_prompt, with_kwargs=True),
                      self.features.vision.register_forward_hook(self.take_images),
                      language_model.register_forward_pre_hook(self.route, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        for m in self.layers:
            m.weights = None
        self.prompt = self.pooled = None

    def take_prompt(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            assert ids is not None, "the router reads input_ids: a forward with inputs_embeds alone cannot route"
            mask = kwargs.get("attention_mask")
            self.prompt = (ids, torch.ones_like(ids) if mask is None else mask)

    def take_images(self, module, args, output):
        self.pooled = output.pooler_output

    @torch.no_grad()
    def route(self, module, args, kwargs):
        if self.prompt is None:  # a decoding step: the prompt's weights stay
            return
        ids, mask = self.prompt
        has = self.features.has_image(ids)
        w = self.weigh(self.features.image(self.pooled if has.any() else None, has), has,
                       self.features.instruction(ids, mask))
        for m in self.layers:
            m.weights = w
        self.routed.append(w.argmax(1).cpu())
        self.prompt = self.pooled = None

    def task_done(self, task):
        """{"routed": the share of `task`'s records routed since the last call, on all the ranks, whose largest
        weight is `task`'s own expert}: the routing accuracy of what the evaluation routed (at --hide_router=batch or
        --disco_router=batch every record of a batch has the batch's weights)."""
        chosen = torch.cat(self.routed) if self.routed else torch.zeros(0, dtype=torch.long)  # (records on this rank,)
        self.routed = []
        counts = torch.tensor([int((chosen == self.tasks.index(task)).sum()), len(chosen)],
                              device=self.features.vision.device)  # (own expert, records)
        if self.world > 1:  # every rank calls task_done after the same task
            dist.all_reduce(counts)
        own, records = counts.tolist()
        assert records, f"{task}: no record was routed (generate inside the method's evaluating() context)"
        return {"routed": own / records}


class TaskRouted(Method):
    """What HiDe-LLaVA and DISCO share: a LoRA expert per task in every linear of the language model (TaskExpertLinear;
    --experts E >= the number of tasks, rank --lora_r / E each, as the official expert_num and lora_r), stage j training
    expert j and the projector (as the official scripts: --mm_projector_lr); the features of each task's training
    records (record_features) kept as the method's state; at evaluation a TestTimeRouter. A subclass says which layers
    are weighted (weighted_layers), what it keeps of a task's features (keep) and how it weighs (weigh)."""
    shardable = False  # the router's hooks and layers are untested under FSDP

    @classmethod
    def check(cls, cfg):
        try:
            n = len(data.parse_tasks(cfg.tasks))
        except ValueError:
            return []  # coin.py reports the task list
        if cfg.experts < n:
            return [f"--method={cls.name} --experts={cfg.experts}: one expert per task, and --tasks has {n}; give "
                    f"--experts={n} (or more)"]
        return []

    def describe(self):
        cfg = self.cfg
        return f"{self.title}: a LoRA expert of rank {cfg.lora_r // cfg.experts} per task (E={cfg.experts})"

    def clip_folder(self):
        return getattr(self.cfg, f"{self.name}_clip")

    def add_adapter(self, model, n_stages):
        from transformers import AutoProcessor
        cfg = self.cfg
        self.processor = AutoProcessor.from_pretrained(cfg.base, backend="pil")
        if not data.vicuna_prompts(self.processor):
            raise cli.UserError(f"--method={self.name} --base={cfg.base}: the router reads the instruction of a "
                                "LLaVA-1.5 (Vicuna v1) prompt, as the official code; this base prompts with a chat "
                                "template")
        names = add_task_experts(model, cfg.lora_r, cfg.lora_alpha, cfg.experts, cfg.lora_dropout,
                                 self.weighted_layers, cfg.seed, self.name)
        self.features = RouterFeatures(model, self.processor.tokenizer, self.clip_folder())
        return names

    def task_features(self, records, stage):
        return record_features(self.features, self.processor, records, data.image_root(self.cfg.data_dir,
                               self.cfg.image_dir), self.cfg.micro_batch, stage.rank, stage.world)

    def start_stage(self, model, stage, records, state):
        """Expert j trains; the task's features are taken now (they do not depend on the training: the towers are
        frozen), for end_stage to return."""
        train_expert(model, stage.index)
        self.kept = {k: v.cpu() for k, v in state.items()}
        self.new = self.keep(*self.task_features(records, stage), stage)  # {name: (d,)}
        return records

    def all_kept(self):
        """{name: (t, d)}: the earlier tasks' kept features and this stage's, in task order."""
        return {k: torch.cat([self.kept[k], v.unsqueeze(0)]) if k in self.kept else v.unsqueeze(0)
                for k, v in self.new.items()}

    def end_stage(self, model, stage, dataset, state):
        return self.all_kept()

    def evaluating(self, model, stage, state):
        # NOTE(fidelity): the experts and kept features of the tasks trained so far; the official evaluation sums the
        # lower layers over its config's cur_task + 1 experts (1 + 1 in its CoIN scripts) and softmaxes over
        # expert_num = 6 anchors (HiDe-LLaVA) or every task's prototype, untrained ones included (DISCO)
        layers = task_expert_layers(model)
        for m in layers:
            m.seen = stage.index + 1
        kept = {k: v.to(self.features.vision.device) for k, v in state.items()}
        assert all(len(v) == stage.index + 1 for v in kept.values()), {k: len(v) for k, v in kept.items()}
        return TestTimeRouter(model, self.features, lambda image, has, text: self.weigh(image, has, text, kept),
                              [m for m in layers if m.rule == "weighted"], stage.earlier + [stage.name], stage.world)


@register
class HiDe(TaskRouted):
    """HiDe-LLaVA: each task keeps the mean of its training records' CLIP image features and CLIP text features (of the
    instruction); at evaluation every layer below the top applies the summed experts (sum B_i)(sum A_i) x, the top
    layer the experts weighed by hide_router. Training is the official: stage j trains expert j alone, s B_j A_j x."""
    name = "hide"
    title = "HiDe-LLaVA"

    @dataclasses.dataclass
    class Settings:
        hide_temperature: float = 0.1     # hide: the router's softmax temperature (official: 0.1)
        hide_router: str = "record"       # hide: record (each record its own weights: the paper, and the official
                                          # evaluation at batch 1) | batch (the official code at a batch: the best
                                          # cosine over the batch, one weight vector for all)
        hide_anchor: str = "mean"         # hide: mean (a task's anchors the mean of its records' features: the
                                          # paper) | official (its code's running mean: a random start counted as one
                                          # record, a bf16 counter, per --micro_batch records)
        hide_clip: str = ""               # hide: the CLIP folder (openai/clip-vit-large-patch14-336) whose text
                                          # tower and visual projection give the router's features; "": the stand-ins
                                          # (docs/methods.md: the tiny base has no text tower)
    rules = {"hide_temperature": cli.POSITIVE, "hide_router": cli.one_of("record", "batch"),
             "hide_anchor": cli.one_of("mean", "official"), "hide_clip": cli.ANY}

    @staticmethod
    def weighted_layers(n_layers):
        return {n_layers - 1}  # the top decoder layer (the official `int(self.layer) != 31`, clitmoelora.py line 412)

    def keep(self, image, has, text, stage):
        if self.cfg.hide_anchor == "official":
            g = seeded_generator(stage.seed, self.name, stage.index)
            return {"image_anchors": official_running_anchor(image[has], self.cfg.micro_batch, g),
                    "text_anchors": official_running_anchor(text, self.cfg.micro_batch, g)}
        # NOTE(fidelity): the mean of the records' features (the paper); the official running mean counts a random
        # start as a record and keeps a bf16 counter (--hide_anchor=official); records without an image are left out
        # of the image anchor (official training gives them a zero image)
        return {"image_anchors": mean_feature(image[has]), "text_anchors": mean_feature(text)}

    def weigh(self, image, has, text, kept):
        return hide_router(image, has, text, kept["image_anchors"], kept["text_anchors"], self.cfg.hide_temperature,
                           self.cfg.hide_router)


@register
class DISCO(TaskRouted):
    """DISCO: each task keeps a prototype of its instructions' CLIP text features (their mean); at evaluation every
    layer applies sum_i w_i B_i A_i x with w = disco_router. Stage j trains slice j alone, as HiDe-LLaVA."""
    name = "disco"
    title = "DISCO"

    @dataclasses.dataclass
    class Settings:
        disco_temperature: float = 0.05   # disco: the router's softmax temperature (official: 0.05)
        disco_router: str = "record"      # disco: record (each record its own weights: the official evaluation at
                                          # batch 1) | batch (the official code at a batch: the batch's mean feature)
        disco_clip: str = ""              # disco: the CLIP folder whose text tower gives the router's feature; "":
                                          # the stand-in (docs/methods.md)
    rules = {"disco_temperature": cli.POSITIVE, "disco_router": cli.one_of("record", "batch"), "disco_clip": cli.ANY}

    @staticmethod
    def weighted_layers(n_layers):
        return set(range(n_layers))  # every layer (DISCO's 32 hard-coded layers, llava_arch.py lines 215-226)

    def keep(self, image, has, text, stage):
        # NOTE(fidelity): the official prototype is a running sum (llava_arch.py lines 190-197: the boundary stays 1),
        # in bf16; the mean here is the sum / n in float64: the same cosine, without bf16's lost low-order terms
        return {"text_prototypes": mean_feature(text)}

    def weigh(self, image, has, text, kept):
        return disco_router(text, kept["text_prototypes"], self.cfg.disco_temperature, self.cfg.disco_router)
