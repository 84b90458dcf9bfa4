"""Distillation losses: sparse/dense KD over a chunked LM head, hidden-state and attention-relation terms.

Everything here is plain torch (no DeepSpeed, nothing else from megadistil).

KD divergences (teacher p, student q, both at temperature T, per token):

    forward_kl  KL(p || q) = sum_b p_b (log p_b - log q_b)
    reverse_kl  KL(q || p) = sum_b q_b (log q_b - log p_b)
    jsd         JSD(beta)  = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (GKD, beta in (0,1))
    uld         sum_r |q_(r) - p_(r)|, the r-th largest probabilities of each side          (ULD, Boizard et al. 2024)

The buckets b are either the whole vocabulary (live teacher) or, for an offline sparse target, the teacher's
top-k ids plus one "tail" bucket holding the remaining mass. The student is mapped to the same buckets; its tail
log-mass is a logsumexp over the complement of the top-k ids (no 1 - sum cancellation).

ULD compares sorted probabilities, not ids, so it needs no shared vocabulary: it is the divergence of a teacher with
another tokenizer. With a top-k + tail target its buckets are the k largest probabilities of each side (sorted) and
each side's tail mass; with a full target, the whole sorted vocabularies (the shorter padded with zeros).

Per-token loss = kd_weight * T^2 * kd + ce_weight * ce. CE is averaged over tokens whose label is not IGNORE_INDEX;
KD over those of them that have a target (`kd_mask`: a cross-tokenizer teacher has none where its token boundaries
differ from the student's). Optional per-token weights (preference-weighted KD) multiply both terms of a token.
The hidden-state and attention-relation terms are separate functions; the trainer adds them with
`hidden_weight` and `attn_relation_weight`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from megadistil.utils import require

IGNORE_INDEX = -100
# A tail of exactly 0 (k == vocab, or a top-k holding everything in float32) would make log p_tail = -inf and
# reverse KL infinite as soon as the student puts any mass there. The one floor for the tail's log-mass, wherever
# a target is made or read (live teachers, shards); exp(floor) = 1e-12 is far below any mass that matters.
TAIL_LOGMASS_FLOOR = math.log(1e-12)


class KDKind(enum.StrEnum):
    """loss.kind: the divergence on the teacher's distribution."""

    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"
    uld = "uld"  # sorted-probability L1: tokenizer-free


class Target(enum.StrEnum):
    """What a loss term reads from the teacher (a teacher kind declares which of these it provides)."""

    logits = "logits"  # a distribution over the vocabulary: top-k + tail, or dense logits
    hidden = "hidden"  # per-layer hidden states
    qkv = "qkv"  # attention q/k/v projections
    foreign_hidden = "foreign_hidden"  # final hidden states of a teacher with another tokenizer (DSKD's projector input)


# The loss weight that turns on each term reading a teacher target (LossConfig.needs; config.validate_teacher).
TARGET_WEIGHTS = {Target.logits: "kd_weight", Target.hidden: "hidden_weight", Target.qkv: "attn_relation_weight",
                  Target.foreign_hidden: "dskd_weight"}

LayerSpec = list[int] | str


@dataclass
class LossConfig:
    """Loss settings; composed into the run config under the key `loss`."""

    kind: KDKind = KDKind.forward_kl  # the divergence on the teacher's distribution
    jsd_beta: float = 0.5  # JSD's β (mixture weight of the teacher)
    temperature: float = 1.0  # softmax temperature of teacher and student; the KD term is scaled by T²
    kd_weight: float = 1.0  # weight of the KD term
    ce_weight: float = 0.0  # weight of CE on the labels
    hidden_weight: float = 0.0  # weight of the hidden-state cosine term (live teacher)
    hidden_magnitude_weight: float = 0.0  # weight of the relative-norm term inside the hidden-state loss
    hidden_layers: LayerSpec = "all"  # "all" or a list of decoder layer indices
    attn_relation_weight: float = 0.0  # weight of MiniLM/BitDistill attention-relation distillation (live teacher)
    attn_relation_heads: int = 8  # relation heads Q/K/V are split into
    attn_relation_layers: LayerSpec = field(default_factory=lambda: [-1])  # layers distilled by relation
    attn_relation_temperature: float = 1.0  # temperature of the relation softmax
    dskd_weight: float = 0.0  # DSKD-style dual-space term (a teacher with another tokenizer): its hidden states, projected into the student's space and read by the student's head, as a KD target
    chunk_tokens: int = 1024  # tokens per LM-head chunk: no [tokens x vocab] tensor is ever materialised

    def needs(self) -> dict[Target, str]:
        """The teacher targets this loss reads, each with the key that asks for it."""
        return {target: f"loss.{key}" for target, key in TARGET_WEIGHTS.items() if getattr(self, key)}

    def held_out(self, kd: bool) -> LossConfig:
        """What evaluation measures: CE on the labels and, with `kd`, this run's KD divergence (kind, β, T) alone."""
        return LossConfig(kind=self.kind, jsd_beta=self.jsd_beta, temperature=self.temperature, kd_weight=float(kd),
                          ce_weight=1.0, chunk_tokens=self.chunk_tokens)

    def validate(self) -> None:
        """Raise ValueError naming the first bad key."""
        _require(self.kind in set(KDKind), "loss.kind", self.kind, f"one of {[k.value for k in KDKind]}")
        _require(0.0 < self.jsd_beta < 1.0, "loss.jsd_beta", self.jsd_beta, "in (0, 1)")
        _require(self.temperature > 0 and math.isfinite(self.temperature), "loss.temperature", self.temperature, "> 0")
        for key in ("kd_weight", "ce_weight", "hidden_weight", "hidden_magnitude_weight", "attn_relation_weight",
                    "dskd_weight"):
            value = getattr(self, key)
            _require(value >= 0 and math.isfinite(value), f"loss.{key}", value, ">= 0 and finite")
        require(self.kd_weight > 0 or self.ce_weight > 0, "loss.kd_weight",
                "is 0 and so is loss.ce_weight: the LM-head loss would be empty")
        _require(isinstance(self.chunk_tokens, int) and self.chunk_tokens > 0, "loss.chunk_tokens",
                 self.chunk_tokens, "a positive int")
        _require(isinstance(self.attn_relation_heads, int) and self.attn_relation_heads > 0,
                 "loss.attn_relation_heads", self.attn_relation_heads, "a positive int")
        _require(self.attn_relation_temperature > 0, "loss.attn_relation_temperature",
                 self.attn_relation_temperature, "> 0")
        _check_layer_spec(self.hidden_layers, "loss.hidden_layers")
        _check_layer_spec(self.attn_relation_layers, "loss.attn_relation_layers")


def _require(ok: bool, key: str, value: object, what: str) -> None:
    require(ok, key, f"must be {what}, got {value!r}")


def _check_layer_spec(spec: object, key: str) -> None:
    if spec == "all":
        return
    ok = isinstance(spec, (list, tuple)) and len(spec) > 0 and all(
        isinstance(i, int) and not isinstance(i, bool) for i in spec)
    _require(ok, key, spec, "'all' or a non-empty list of layer indices")


def resolve_layers(spec: LayerSpec, num_layers: int, key: str) -> list[int]:
    """Turn a layer spec ("all" or indices, negative from the end) into sorted unique indices in [0, num_layers)."""
    _check_layer_spec(spec, key)
    if spec == "all":
        return list(range(num_layers))
    out = set()
    for i in spec:
        if not -num_layers <= i < num_layers:
            raise ValueError(f"{key}: layer {i} out of range for a model with {num_layers} layers")
        out.add(i % num_layers)
    return sorted(out)


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward applies to its LM head's output z: y = cap * tanh(scale * z / cap) with a softcap
    (Gemma 2/3's final_logit_softcapping), else y = scale * z (Cohere's logit_scale, 1 / Granite's logits_scaling).
    The identity for most models. megadistil.models.logit_transform reads it from a model."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply_(self, z: Tensor) -> Tensor:
        """y from z, in place."""
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def derivative(self, y: Tensor) -> Tensor | float:
        """dy/dz, elementwise, from the transformed y (tanh' = 1 - tanh^2, so z is not needed)."""
        if self.softcap is None:
            return self.scale
        return (y / self.softcap).square_().neg_().add_(1.0).mul_(self.scale)


@dataclass
class SparseTarget:
    """A teacher's target per token: top-k ids and log-probs (at temperature T, sorted desc) + the tail's log-mass."""

    topk_ids: Tensor  # int64 [N, k]
    topk_logprobs: Tensor  # float [N, k]
    tail_logmass: Tensor  # float [N], log(1 - sum(exp(topk_logprobs))) computed in log space, >= TAIL_LOGMASS_FLOOR
    # bool [N, k]: entries that are buckets (None: all). Another tokenizer's top-k mapped onto the student's vocabulary
    # has holes where a teacher token has no student token: their mass is in the tail, their id repeats a present one.
    present: Tensor | None = None

    def flat(self, num_tokens: int, vocab: int, *, student_ids: bool = True) -> SparseTarget:
        """Flatten leading dims to [N, k] and check shapes and id range (errors name the field). `student_ids`
        False: the ids are another tokenizer's (a ULD target reads only the sorted probabilities)."""
        k = self.topk_ids.shape[-1]
        ids = self.topk_ids.reshape(-1, k)
        logprobs = self.topk_logprobs.reshape(-1, k)
        tail = self.tail_logmass.reshape(-1)
        present = self.present.reshape(-1, k) if self.present is not None else None
        if present is not None and k >= vocab:
            raise ValueError(f"sparse.present: a target with holes needs k={k} < the student's vocab={vocab}")
        for name, t in (("sparse.topk_ids", ids), ("sparse.topk_logprobs", logprobs), ("sparse.tail_logmass", tail)):
            if t.shape[0] != num_tokens:
                raise ValueError(f"{name} has {t.shape[0]} tokens, hidden has {num_tokens}")
        if ids.dtype != torch.int64:
            raise ValueError(f"sparse.topk_ids must be int64, got {ids.dtype}")
        if not 0 < k <= vocab:
            raise ValueError(f"sparse.topk_ids: k={k} must be in [1, the student's vocab={vocab}]")
        if student_ids and ids.numel():
            lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
            if lo < 0 or hi >= vocab:
                raise ValueError(f"sparse.topk_ids has ids outside [0, {vocab})")
        return SparseTarget(ids, logprobs.float(), tail.float(), present)


# ----------------------------------------------------------------------------------------------------------------
# Divergences over buckets. All inputs float32 [c, B]; g = d kd / d log q_b (the loss's own gradient, before the
# softmax/bucket map), so one back-map serves every kind.


def _bucket_divergence(kind: str, beta: float, logp: Tensor, logq: Tensor, p: Tensor, need_grad: bool,
                       present: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """uld expects both sides' buckets sorted by probability (the caller pairs them by rank). `present` [c, B]: the
    buckets that exist; an absent one (p = q = 0, log-probs -inf) adds 0 and gets no gradient."""
    q = logq.exp()
    if kind == "jsd":
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        to_p, to_q = _kept(p * (logp - logm), present), _kept(q * (logq - logm), present)
        # d/dq_b of beta*KL(p||m) + (1-beta)*KL(q||m) simplifies to (1-beta) log(q_b/m_b).
        return beta * to_p.sum(-1) + (1.0 - beta) * to_q.sum(-1), ((1.0 - beta) * to_q if need_grad else None)
    if kind == "forward_kl":
        term, g = p * (logp - logq), (-p if need_grad else None)
    elif kind == "reverse_kl":
        diff = logq - logp
        term, g = q * diff, (q * (diff + 1.0) if need_grad else None)
    else:  # uld
        diff = q - p
        term, g = diff.abs(), (q * diff.sign() if need_grad else None)
    return _kept(term, present).sum(-1), (_kept(g, present) if g is not None else None)


def _kept(x: Tensor, present: Tensor | None) -> Tensor:
    return x if present is None else x.masked_fill(~present, 0.0)


def _dense_kd(kind: str, beta: float, z: Tensor, temperature: float, t_logits: Tensor,
              need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """KD against a full teacher distribution. z: the student's float32 logits [c, V] (left unchanged); t_logits:
    the teacher's, consumed. Written in place so that at most 3 (forward_kl, reverse_kl), 4 (jsd) or 5 (uld: its
    sort's int64 indices) [c, V] float32 buffers live besides z: with a 128-256k vocabulary these buffers are the
    loss's whole memory (engine.memory.DENSE_LOGIT_BUFFERS counts them, z included)."""
    if temperature != 1.0:
        t_logits = t_logits.div_(temperature)
    logp = t_logits.sub_(torch.logsumexp(t_logits, -1, keepdim=True))
    del t_logits
    s = (lambda: z / temperature) if temperature != 1.0 else (lambda: z)  # made when needed, freed at once
    if kind == "uld":
        p_sorted = logp.exp_().sort(-1, descending=True).values
        del logp
        return _dense_uld(p_sorted, torch.softmax(s(), -1), need_grad)
    logq = torch.log_softmax(s(), -1)
    if kind == "forward_kl":
        log_ratio = logp - logq
        p = logp.exp_()
        kd = log_ratio.mul_(p).sum(-1)
        del log_ratio
        g = None  # d kd / d log q_b = -p_b: formed below without a buffer of its own
    elif kind == "reverse_kl":
        diff = logq - logp
        q = torch.exp(logq, out=logp)  # logp is no longer needed: its buffer takes q
        kd = torch.mul(diff, q, out=logq).sum(-1)
        g = diff.add_(1.0).mul_(q)
    else:  # jsd
        logm, other = logp + math.log(beta), logq + math.log1p(-beta)
        torch.logaddexp(logm, other, out=logm)
        kd_p = torch.sub(logp, logm, out=other).mul_(logp.exp_()).sum(-1)
        to_q = torch.sub(logq, logm, out=other)
        q = logq.exp_()
        to_q.mul_(q)
        kd = beta * kd_p + (1.0 - beta) * to_q.sum(-1)
        # d/dq_b of beta*KL(p||m) + (1-beta)*KL(q||m) simplifies to (1-beta) log(q_b/m_b).
        g = to_q.mul_(1.0 - beta)
    if not need_grad:
        return kd, None
    # Through log_softmax: d/ds_j = g_j - q_j * sum_b g_b.
    if g is None:  # forward_kl: -p_j + q_j * sum_b p_b
        return kd, logq.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p)
    return kd, g.sub_(q.mul_(g.sum(-1, keepdim=True)))


def _dense_uld(p_sorted: Tensor, q: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """ULD over whole vocabularies: the teacher's probabilities sorted (consumed) against the student's q [c, V],
    paired by rank; the gradient goes back through the student's sort."""
    q_sorted, order = q.sort(-1, descending=True)
    diff = torch.sub(q_sorted, p_sorted, out=p_sorted)
    kd = torch.linalg.vector_norm(diff, 1, -1)  # sum |q - p| without a buffer for the absolute values
    if not need_grad:
        return kd, None
    g_sorted = diff.sign_().mul_(q_sorted)  # d kd / d log q_b = q_b sign(q_b - p_b)
    g = q_sorted.scatter_(-1, order, g_sorted)  # `order` is a permutation: every entry of q_sorted is overwritten
    del g_sorted, diff, order
    return kd, g.sub_(q.mul_(g.sum(-1, keepdim=True)))


def _sparse_kd(kind: str, beta: float, s: Tensor, ids: Tensor, t_logprobs: Tensor, tail: Tensor, need_grad: bool,
               present: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """KD against top-k + tail buckets; s is the student's tempered float32 logits [c, V] (consumed). `present`
    [c, k]: the entries that are buckets; an absent entry's id repeats a present one's (so the complement, the tail,
    is the same set), its log-probs on both sides are -inf."""
    vocab, k = s.shape[-1], ids.shape[-1]
    if kind == "uld":
        # ULD pairs probabilities by rank, not by id: the student's buckets are its own k largest (sorted), the
        # teacher's its sorted top-k, and each side's tail; the teacher's ids are never read.
        ids = s.topk(k, -1).indices
        t_logprobs = t_logprobs.sort(-1, descending=True).values
        present = None  # a hole is a probability of 0 in the sorted vector
    s_top = s.gather(-1, ids)
    if present is not None:
        s_top, t_logprobs = s_top.masked_fill(~present, float("-inf")), t_logprobs.masked_fill(~present, float("-inf"))
        present = torch.cat([present, present.new_ones(present.shape[0], 1)], -1)  # the tail bucket always exists
    if k == vocab:
        # Full target: the complement is empty and the stored tail is rounding noise, so there is no tail bucket.
        logq_top = s_top - torch.logsumexp(s, -1, keepdim=True)
        kd, g = _bucket_divergence(kind, beta, t_logprobs, logq_top, t_logprobs.exp(), need_grad)
        if g is None:
            return kd, None
        grad_top = g - logq_top.exp() * g.sum(-1, keepdim=True)
        return kd, torch.zeros_like(s).scatter_(-1, ids, grad_top)
    # The one [c, V] buffer of this function, s itself: the complement's logits, in place exp(s_j - lse_tail).
    tail_exp = s.scatter_(-1, ids, float("-inf"))
    lse_tail = _logsumexp_(tail_exp)
    lse = torch.logaddexp(torch.logsumexp(s_top, -1, keepdim=True), lse_tail)
    logq = torch.cat([s_top, lse_tail], -1) - lse
    log_tail = tail.clamp(TAIL_LOGMASS_FLOOR, 0.0).unsqueeze(-1)
    logp = torch.cat([t_logprobs, log_tail], -1)
    p = logp.exp()
    kd, g = _bucket_divergence(kind, beta, logp, logq, p, need_grad, present)
    if g is None:
        return kd, None
    g_sum = g.sum(-1, keepdim=True)
    q = logq.exp()
    # Complement ids j: d log q_tail / d s_j = q_j / q_tail - q_j, so grad_j = exp(s_j - lse_tail) * (g_tail -
    # G q_tail) with G = sum_b g_b; written this way nothing divides by a tiny q_tail.
    coef = g[:, -1:] - g_sum * q[:, -1:]
    grad = tail_exp.mul_(coef)  # exactly 0 at the top-k ids, so adding scatters them (an absent entry adds 0)
    return kd, grad.scatter_add_(-1, ids, g[:, :-1] - q[:, :-1] * g_sum)


def _logsumexp_(x: Tensor) -> Tensor:
    """logsumexp over the last dim (keepdim); overwrites x with exp(x - lse) to avoid a [c, V] temporary."""
    m = x.amax(-1, keepdim=True)
    lse = m + x.sub_(m).exp_().sum(-1, keepdim=True).log()
    x.mul_((m - lse).exp())
    return lse


# ----------------------------------------------------------------------------------------------------------------
# The chunked LM head.


@dataclass
class _Chunk:
    """Targets of one chunk of (valid) tokens."""

    labels: Tensor
    sparse: SparseTarget | None = None
    teacher_hidden: Tensor | None = None
    kd_scale: Tensor | None = None  # per token: its weight, 0 where it has no KD target (None: 1 everywhere)
    ce_scale: Tensor | None = None  # per token: its weight (None: 1 everywhere)


def _chunk_terms(z: Tensor, chunk: _Chunk, cfg: LossConfig, teacher_weight: Tensor | None, transform: LogitTransform,
                 need_grad: bool, kd_norm: float = 1.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sum of KD and CE over the chunk's tokens and, if asked, d(per-token loss sum)/dz, where the KD part of the
    sum is scaled by kd_norm (the loss averages KD over fewer tokens than CE when some have no target).

    z: float32 head outputs [c, V], consumed (overwritten) to keep the number of [c, V] buffers low. The losses are
    on the model's logits transform(z); a softcap costs one more [c, V] buffer (its derivative) when grads are wanted.
    """
    T = cfg.temperature
    z = transform.apply_(z)
    dy_dz = transform.derivative(z) if need_grad and not transform.identity else None
    lse1 = torch.logsumexp(z, -1, keepdim=True)
    ce = (lse1 - z.gather(-1, chunk.labels.unsqueeze(-1))).squeeze(-1)
    kd = grad = None
    if chunk.sparse is not None or chunk.teacher_hidden is not None:
        if chunk.sparse is not None:
            sp = chunk.sparse
            kd, grad = _sparse_kd(cfg.kind, cfg.jsd_beta, z / T, sp.topk_ids, sp.topk_logprobs, sp.tail_logmass,
                                  need_grad, sp.present)  # z / T: a copy (even at T = 1) that _sparse_kd consumes
        else:
            with torch.no_grad():  # passed as a temporary: _dense_kd overwrites it and frees it when done
                kd, grad = _dense_kd(cfg.kind, cfg.jsd_beta, z, T, transform.apply_(
                    (chunk.teacher_hidden @ teacher_weight.T).float()), need_grad)
        if chunk.kd_scale is not None:
            kd, grad = _scale_rows(kd, grad, chunk.kd_scale)
    if chunk.ce_scale is not None:
        ce = ce * chunk.ce_scale
    kd_sum = kd.sum() if kd is not None else z.new_zeros(())
    if not need_grad:
        return kd_sum, ce.sum(), None
    grad = grad.mul_(cfg.kd_weight * T * kd_norm) if grad is not None else None  # T^2 scaling times ds/dz = 1/T
    if cfg.ce_weight:
        soft = z.sub_(lse1).exp_()
        soft.scatter_add_(-1, chunk.labels.unsqueeze(-1), -torch.ones_like(lse1))
        if chunk.ce_scale is not None:
            soft.mul_(chunk.ce_scale.unsqueeze(-1))
        grad = soft.mul_(cfg.ce_weight) if grad is None else grad.add_(soft, alpha=cfg.ce_weight)
    if grad is None:
        return kd_sum, ce.sum(), torch.zeros_like(z)
    return kd_sum, ce.sum(), grad.mul_(dy_dz) if dy_dz is not None else grad  # chain rule through the transform


def _scale_rows(kd: Tensor, grad: Tensor | None, scale: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-token weights on the KD term; a row of weight 0 (no target there) is exactly 0 even if its target held
    anything (the placeholder row of an unaligned position)."""
    dropped = scale == 0
    kd = (kd * scale).masked_fill_(dropped, 0.0)
    if grad is not None:
        grad.mul_(scale.unsqueeze(-1)).masked_fill_(dropped.unsqueeze(-1), 0.0)  # no host sync
    return kd, grad


def _chunks(valid: Tensor, labels: Tensor, sparse: SparseTarget | None, teacher_hidden: Tensor | None,
            kd_scale: Tensor | None, ce_scale: Tensor | None, chunk_tokens: int):
    for start in range(0, valid.numel(), chunk_tokens):
        idx = valid[start:start + chunk_tokens]
        sp = None
        if sparse is not None:
            sp = SparseTarget(sparse.topk_ids[idx], sparse.topk_logprobs[idx], sparse.tail_logmass[idx],
                              sparse.present[idx] if sparse.present is not None else None)
        th = teacher_hidden[idx] if teacher_hidden is not None else None
        yield idx, _Chunk(labels[idx], sp, th, *(x[idx] if x is not None else None for x in (kd_scale, ce_scale)))


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Per-chunk logits + loss sums, nothing [N, V] kept. When gradients are wanted, each chunk's gradient is formed
    in the same pass (the loss is the graph's end, so dL/dloss is a scalar known to scale it linearly): backward only
    scales the [N, H] (and [V, H]) gradients, and no logits are computed twice."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, cfg, ids, logprobs, tail, present, teacher_hidden, teacher_weight,
                transform, kd_scale, ce_scale, kd_count):
        sparse = SparseTarget(ids, logprobs, tail, present) if ids is not None else None
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        kd_sum = hidden.new_zeros((), dtype=torch.float32)
        ce_sum = kd_sum.clone()
        # Accumulated in float32 over chunks (bf16 weights too), cast once in backward.
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        count = max(valid.numel(), 1)
        kd_count = count if kd_count is None else max(kd_count, 1)
        for idx, chunk in _chunks(valid, labels, sparse, teacher_hidden, kd_scale, ce_scale, cfg.chunk_tokens):
            h = hidden[idx]
            z = (h @ weight.T).float()
            kd, ce, grad_z = _chunk_terms(z, chunk, cfg, teacher_weight, transform, need_grad=want_h or want_w,
                                          kd_norm=count / kd_count if kd_count != count else 1.0)
            del z
            kd_sum += kd
            ce_sum += ce
            if grad_z is not None:
                grad_z = grad_z.to(weight.dtype)
                if want_h:
                    grad_h.index_add_(0, idx, (grad_z @ weight).float())
                if want_w:
                    grad_w.addmm_(grad_z.T.float(), h.float())
            del grad_z  # before the next chunk's logits exist
        kd_mean, ce_mean = kd_sum / kd_count, ce_sum / count
        loss = cfg.kd_weight * cfg.temperature ** 2 * kd_mean + cfg.ce_weight * ce_mean
        ctx.count, ctx.dtypes = count, (hidden.dtype, weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return loss, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss.float() / ctx.count
        grad_h = (grad_h * scale).to(ctx.dtypes[0]) if grad_h is not None else None
        grad_w = (grad_w * scale).to(ctx.dtypes[1]) if grad_w is not None else None
        return grad_h, grad_w, *([None] * 13)


def chunked_lm_head_loss(hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, cfg: LossConfig, *,
                         sparse: SparseTarget | None = None, teacher_hidden: Tensor | None = None,
                         teacher_lm_head_weight: Tensor | None = None,
                         logit_transform: LogitTransform | None = None, kd_mask: Tensor | None = None,
                         token_weights: Tensor | None = None) -> dict[str, Tensor]:
    """LM head + KD/CE loss in token chunks; the [N, V] logits never exist, in forward or backward.

    hidden [..., H] (student final-norm output), lm_head_weight [V, H], labels [...] (IGNORE_INDEX = skip).
    Targets: `sparse` (offline top-k + tail, log-probs at cfg.temperature) or `teacher_hidden` [..., H] with
    `teacher_lm_head_weight` [V, H] (live teacher; may be the student's own lm_head tensor). Teacher tensors get
    no gradient. The matmul runs in the inputs' dtype; the softmax math runs in float32. `logit_transform` is what
    the model's forward applies to the head's output (softcapping, scaling): applied to the student's logits and to
    the live teacher's, so both are the model's own (sparse targets were made from transformed logits already).
    `kd_mask` [...] (bool): the tokens that have a KD target (None: all); a `sparse` target of another tokenizer
    (loss.kind uld) has placeholder rows where it is False. `token_weights` [...] multiply each token's KD and CE.

    Returns {"loss": kd_weight*T^2*kd + ce_weight*ce (differentiable), "kd": mean divergence over the tokens with a
    target, "ce": mean CE (both detached, for logging), "tokens": number of non-ignored tokens, "kd_tokens": how many
    of them have a KD target}.
    """
    cfg.validate()
    H = hidden.shape[-1]
    hidden = hidden.reshape(-1, H)
    labels = labels.reshape(-1)
    vocab = lm_head_weight.shape[0]
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != H:
        raise ValueError(f"lm_head_weight shape {tuple(lm_head_weight.shape)} does not match hidden size {H}")
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} tokens, hidden has {hidden.shape[0]}")
    valid = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    if valid.numel() and not bool(((labels[valid] >= 0) & (labels[valid] < vocab)).all()):  # one host sync
        raise ValueError(f"labels has values outside [0, {vocab}) other than {IGNORE_INDEX}")
    ids = logprobs = tail = present = None
    if sparse is not None and teacher_hidden is not None:
        raise ValueError("give either sparse or teacher_hidden as the KD target, not both")
    if sparse is not None:
        flat = sparse.flat(hidden.shape[0], vocab, student_ids=cfg.kind != KDKind.uld)
        ids, logprobs, tail, present = flat.topk_ids, flat.topk_logprobs, flat.tail_logmass, flat.present
    if teacher_hidden is not None:
        teacher_hidden, teacher_lm_head_weight = _check_teacher(teacher_hidden, teacher_lm_head_weight,
                                                                hidden.shape[0], vocab)
    if cfg.kd_weight and ids is None and teacher_hidden is None:
        raise ValueError("loss.kd_weight > 0 needs a KD target: pass sparse= or teacher_hidden=")
    mask = _per_token(kd_mask, labels, "kd_mask")
    weights = _per_token(token_weights, labels, "token_weights")
    kd_scale = weights if mask is None else (weights if weights is not None else 1.0) * mask
    kd_count = None if mask is None else int(mask[valid].sum())
    loss, kd, ce = _ChunkedLMHeadLoss.apply(hidden, lm_head_weight, labels, valid, cfg, ids, logprobs, tail, present,
                                            teacher_hidden, teacher_lm_head_weight, logit_transform or LogitTransform(),
                                            kd_scale, weights, kd_count)
    tokens = torch.tensor(valid.numel(), device=hidden.device)
    return {"loss": loss, "kd": kd, "ce": ce, "tokens": tokens,
            "kd_tokens": tokens.clone() if kd_count is None else torch.tensor(kd_count, device=hidden.device)}


def _per_token(values: Tensor | None, labels: Tensor, name: str) -> Tensor | None:
    """A per-token tensor flattened to the labels' [N], float32 (a bool mask becomes 0/1)."""
    if values is None:
        return None
    flat = values.reshape(-1)
    if flat.shape[0] != labels.shape[0]:
        raise ValueError(f"{name} has {flat.shape[0]} tokens, labels has {labels.shape[0]}")
    if not values.dtype.is_floating_point and values.dtype != torch.bool:
        raise ValueError(f"{name} must be bool or float, got {values.dtype}")
    out = flat.float()
    if values.dtype != torch.bool and not bool((torch.isfinite(out) & (out >= 0)).all()):  # one host sync
        raise ValueError(f"{name} must be finite and >= 0")
    return out


def _check_teacher(teacher_hidden: Tensor, weight: Tensor | None, num_tokens: int,
                   vocab: int) -> tuple[Tensor, Tensor]:
    if weight is None:
        raise ValueError("teacher_hidden needs teacher_lm_head_weight")
    th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    if th.shape[0] != num_tokens:
        raise ValueError(f"teacher_hidden has {th.shape[0]} tokens, hidden has {num_tokens}")
    if tuple(weight.shape) != (vocab, th.shape[1]):
        raise ValueError(f"teacher_lm_head_weight shape {tuple(weight.shape)} != (vocab={vocab}, {th.shape[1]})")
    return th, weight.detach()


# ----------------------------------------------------------------------------------------------------------------
# Hidden states and attention relations (live teacher only).


def _token_mask(mask: Tensor | None, like: Tensor, name: str) -> Tensor:
    lead = like.shape[:-1]
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=like.device)
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} != token shape {tuple(lead)}")
    return mask.bool()


def hidden_state_loss(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], mask: Tensor | None, *,
                      magnitude_weight: float = 0.0) -> Tensor:
    """Mean over layers and masked-in tokens of (1 - cos(s, t)) + magnitude_weight * (|s| - |t|)^2 / |t|^2.

    The magnitude term is the squared *relative* norm error, so it is scale-free across layers (the residual
    stream grows with depth) and 0 iff the norms match; cosine alone ignores norms entirely.
    Hidden states are [..., H] per layer, mask is [...] (True = token counts) or None.
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"hidden_state_loss: {len(student_hidden)} student layers vs {len(teacher_hidden)} teacher")
    per_layer = []
    for i, (s, t) in enumerate(zip(student_hidden, teacher_hidden)):
        if s.shape != t.shape:
            raise ValueError(f"hidden_state_loss layer {i}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        keep = _token_mask(mask, s, f"hidden_state_loss layer {i}")
        s32, t32 = s.float(), t.detach().float()
        term = 1.0 - F.cosine_similarity(s32, t32, dim=-1, eps=1e-8)
        if magnitude_weight:
            t_norm = t32.norm(dim=-1)
            term = term + magnitude_weight * (s32.norm(dim=-1) - t_norm).square() / t_norm.square().clamp_min(1e-12)
        # masked sums, not boolean indexing: no host sync per layer
        per_layer.append(term.masked_fill(~keep, 0.0).sum() / keep.sum().clamp_min(1))
    return torch.stack(per_layer).mean()


def _relations(x: Tensor, heads: int, temperature: float, key_mask: Tensor, name: str) -> Tensor:
    """log softmax(X_h X_h^T / sqrt(d_r) / temperature) per relation head, causal; x [B, S, W] -> [B, h, S, S]."""
    B, S, W = x.shape
    if W % heads:
        raise ValueError(f"attention_relation_loss: {name} width {W} is not divisible by {heads} relation heads")
    xh = x.float().reshape(B, S, heads, W // heads).transpose(1, 2)
    scores = xh @ xh.transpose(-1, -2) / (math.sqrt(W // heads) * temperature)
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
    allowed = causal & key_mask[:, None, None, :]
    # Every row keeps its diagonal so a masked-out row stays finite; those rows are dropped from the mean anyway.
    allowed = allowed | torch.eye(S, dtype=torch.bool, device=x.device)
    return torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), -1), allowed


def attention_relation_loss(student_qkv: Sequence[Tensor], teacher_qkv: Sequence[Tensor], mask: Tensor | None, *,
                            num_relation_heads: int, temperature: float = 1.0, rows: Tensor | None = None) -> Tensor:
    """MiniLM-v2 / BitDistill self-attention relation distillation for one layer.

    For X in (Q, K, V) (each [B, S, width], e.g. q_proj/k_proj/v_proj outputs; with GQA K/V are narrower): split
    X into `num_relation_heads` heads of size d_r, R_X = softmax(X X^T / sqrt(d_r)) with a causal (and padding)
    mask, then KL(R_X^teacher || R_X^student) per row. Summed over Q, K, V; mean over relation heads and valid rows.
    mask: [B, S] True for real tokens (None = all): the keys, and the rows unless `rows` [B, S] says which rows count
    (e.g. only the completion's, whose keys still include the prompt before it).
    """
    if len(student_qkv) != 3 or len(teacher_qkv) != 3:
        raise ValueError("attention_relation_loss expects (q, k, v) for student and teacher")
    total = None
    for name, s, t in zip("qkv", student_qkv, teacher_qkv):
        if s.dim() != 3 or s.shape[:2] != t.shape[:2]:
            raise ValueError(f"attention_relation_loss: {name} student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        keep = _token_mask(mask, s, f"attention_relation_loss {name}")
        counted = keep if rows is None else keep & _token_mask(rows, s, f"attention_relation_loss {name} rows")
        log_s, allowed = _relations(s, num_relation_heads, temperature, keep, f"student {name}")
        log_t, _ = _relations(t.detach(), num_relation_heads, temperature, keep, f"teacher {name}")
        # Disallowed entries are -inf in both; zero their difference so they add nothing (not nan).
        kl = (log_t.exp() * (log_t - log_s).masked_fill(~allowed, 0.0)).sum(-1)  # [B, h, S]
        counted_rows = counted[:, None, :].expand_as(kl)
        term = kl.masked_fill(~counted_rows, 0.0).sum() / counted_rows.sum().clamp_min(1)  # no host sync
        total = term if total is None else total + term
    return total
