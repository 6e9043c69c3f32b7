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
        with method.evaluating(model, stage, state):  evaluate every task seen so far

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

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cli
from base_model import projector
from moelora import AdapterLayer, adapter_parameters, add_moelora, target_linears


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
        undoes it on exit."""
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
    nn.Dropout (src/peft/tuners/lora.py, forward)."""

    def __init__(self, base, r, alpha, dropout, tasks):
        super().__init__()
        assert isinstance(base, nn.Linear), f"OLoRALinear wraps an nn.Linear, got {type(base).__name__}"
        self.base = base.requires_grad_(False)
        self.r, self.scaling, self.dropout, self.active = r, alpha / r, dropout, 0
        d_in, d_out, device = base.in_features, base.out_features, base.weight.device
        self.lora_A = nn.ParameterList([nn.Parameter(torch.zeros(r, d_in, device=device)) for _ in range(tasks)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(d_out, r, device=device)) for _ in range(tasks)])

    def forward(self, x):  # x: (..., d_in)
        y = self.base(x)  # (..., d_out)
        if not self.active:
            return y
        h = x.to(self.lora_A[0].dtype)
        if self.training and self.dropout > 0:
            h = F.dropout(h, self.dropout)
        A = torch.cat(list(self.lora_A)[:self.active])  # (t r, d_in): every active subspace in one product
        B = torch.cat(list(self.lora_B)[:self.active], dim=1)  # (d_out, t r)
        return y + ((h @ A.t()) @ B.t() * self.scaling).to(y.dtype)


def olora_layers(model):
    return [m for m in model.modules() if isinstance(m, OLoRALinear)]


def add_olora(model, names, r, alpha, dropout, tasks):
    """Wrap the nn.Linear layers `names` in OLoRALinear with `tasks` subspaces, none active yet (the model computes
    as the base until set_active)."""
    assert not olora_layers(model), "the model has O-LoRA layers already: add_olora runs once"
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, OLoRALinear(model.get_submodule(name), r, alpha, dropout, tasks))
    return names


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
        olora_init: str = "kaiming"       # olora: A_t's init: kaiming (PEFT's, the official code) | normal (N(0, 0.01^2))
        olora_l2: str = "norm"            # olora: the L2 term: norm (sum of Frobenius norms, the official code) | squared
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
    of the weights."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        assert isinstance(base, nn.Linear), f"MergedLoRALinear wraps an nn.Linear, got {type(base).__name__}"
        self.base = base.requires_grad_(False)
        self.scaling, self.dropout = alpha / r, dropout
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
            h = F.dropout(h, self.dropout)
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
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, MergedLoRALinear(model.get_submodule(name), r, alpha, dropout))
    return names


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
