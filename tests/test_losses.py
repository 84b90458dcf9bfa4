"""Distillation losses against independent float64 references.

Tolerances: the implementation runs in float32 (softmax math) and is compared with an unchunked float64 autograd
reference; values agree to rtol 2e-5, gradients to rtol 1e-4 / atol 1e-6 times their largest entry, which is
float32 rounding accumulated over a vocabulary-sized sum.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megadistil.distill import (
    IGNORE_INDEX,
    LogitTransform,
    LossConfig,
    SparseTarget,
    attention_relation_loss,
    chunked_lm_head_loss,
    hidden_state_loss,
    resolve_layers,
)

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


# --------------------------------------------------------------------------- independent float64 reference


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(-1)


def _ref_divergence(kind: str, beta: float, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _ref_transform(z: torch.Tensor, transform: LogitTransform | None) -> torch.Tensor:
    """A model's output transform written as Gemma 2's forward writes it (scale first, as Cohere does)."""
    if transform is None:
        return z
    z = z * transform.scale
    return transform.softcap * torch.tanh(z / transform.softcap) if transform.softcap else z


def _ref_loss(h, W, labels, cfg, *, sparse=None, teacher_logits=None, transform=None):
    """Unchunked float64 loss; the student's tail is 1 - sum of its top-k probabilities."""
    z = _ref_transform(h.double() @ W.double().T, transform)
    q = torch.softmax(z / cfg.temperature, -1)
    if sparse is not None:
        q_top = q.gather(-1, sparse.topk_ids)
        Q = torch.cat([q_top, (1 - q_top.sum(-1, keepdim=True))], -1)
        P = torch.cat([sparse.topk_logprobs.double().exp(), sparse.tail_logmass.double().exp()[:, None]], -1)
        kd = _ref_divergence(cfg.kind, cfg.jsd_beta, P, Q)
    elif teacher_logits is not None:
        kd = _ref_divergence(cfg.kind, cfg.jsd_beta, torch.softmax(teacher_logits.double() / cfg.temperature, -1), q)
    else:
        kd = torch.zeros(z.shape[0], dtype=torch.float64)
    ce = F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = labels != IGNORE_INDEX
    per_token = cfg.kd_weight * cfg.temperature**2 * kd + cfg.ce_weight * ce
    return per_token[valid].mean(), kd[valid].mean(), ce[valid].mean()


def _ref_grads(h, W, labels, cfg, **targets):
    h64 = h.detach().double().requires_grad_()
    W64 = W.detach().double().requires_grad_()
    loss, kd, ce = _ref_loss(h64, W64, labels, cfg, **targets)
    loss.backward()
    return loss.detach(), kd.detach(), ce.detach(), h64.grad, W64.grad


def _make_sparse(teacher_logits: torch.Tensor, k: int, T: float) -> SparseTarget:
    logp = torch.log_softmax(teacher_logits.double() / T, -1)
    top, ids = logp.topk(k, -1)
    tail = torch.log1p(-top.exp().sum(-1).clamp_max(1.0))
    return SparseTarget(ids, top.float(), tail.float())


def _problem(N=23, H=16, V=50, seed=0, ignore=(2, 9, 10)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    teacher_logits = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignore)] = IGNORE_INDEX
    return h, W, labels, teacher_logits


def _assert_matches_ref(out, h, W, ref):
    loss, kd, ce, gh, gW = ref
    torch.testing.assert_close(out["loss"].double(), loss, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(out["kd"].double(), kd, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(out["ce"].double(), ce, rtol=2e-5, atol=1e-7)
    out["loss"].backward()
    torch.testing.assert_close(h.grad.double(), gh, rtol=1e-4, atol=1e-6 * gh.abs().max().item())
    torch.testing.assert_close(W.grad.double(), gW, rtol=1e-4, atol=1e-6 * gW.abs().max().item())


# --------------------------------------------------------------------------- KD values and gradients


@pytest.mark.parametrize("kind,beta", KINDS)
def test_sparse_kd_matches_float64_reference(kind, beta):
    h, W, labels, teacher_logits = _problem()
    cfg = LossConfig(kind=kind, jsd_beta=beta, temperature=2.0, kd_weight=0.7, ce_weight=0.4, chunk_tokens=6)
    sparse = _make_sparse(teacher_logits, k=8, T=cfg.temperature)
    assert sparse.tail_logmass.exp().min() > 0.05  # the tail bucket really matters in this test
    ref = _ref_grads(h, W, labels, cfg, sparse=sparse)
    out = chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse)
    assert out["tokens"].item() == 20
    _assert_matches_ref(out, h, W, ref)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_live_teacher_kd_matches_float64_reference(kind, beta):
    h, W, labels, _ = _problem(seed=1)
    g = torch.Generator().manual_seed(5)
    th, TW = torch.randn(h.shape, generator=g), torch.randn(W.shape, generator=g)
    cfg = LossConfig(kind=kind, jsd_beta=beta, temperature=1.5, ce_weight=0.25, chunk_tokens=7)
    ref = _ref_grads(h, W, labels, cfg, teacher_logits=th.double() @ TW.double().T)
    TW.requires_grad_()
    out = chunked_lm_head_loss(h, W, labels, cfg, teacher_hidden=th, teacher_lm_head_weight=TW)
    _assert_matches_ref(out, h, W, ref)
    assert TW.grad is None


def test_shared_teacher_weight_gets_only_the_student_gradient():
    h, W, labels, _ = _problem(seed=2)
    th = torch.randn(h.shape, generator=torch.Generator().manual_seed(3))
    cfg = LossConfig(kind="reverse_kl", chunk_tokens=4)
    ref = _ref_grads(h, W, labels, cfg, teacher_logits=(th.double() @ W.detach().double().T))
    out = chunked_lm_head_loss(h, W, labels, cfg, teacher_hidden=th, teacher_lm_head_weight=W)
    _assert_matches_ref(out, h, W, ref)


@pytest.mark.parametrize("kind,beta", KINDS)
def test_full_vocab_sparse_target_equals_dense(kind, beta):
    h, W, labels, _ = _problem(seed=4, V=40)
    g = torch.Generator().manual_seed(6)
    th, TW = torch.randn(h.shape, generator=g), torch.randn(W.shape, generator=g)
    cfg = LossConfig(kind=kind, jsd_beta=beta, temperature=1.3, chunk_tokens=5)
    sparse = _make_sparse(th.double() @ TW.double().T, k=W.shape[0], T=cfg.temperature)
    dense = chunked_lm_head_loss(h, W, labels, cfg, teacher_hidden=th, teacher_lm_head_weight=TW)
    dense["loss"].backward()
    dense_grads = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    full = chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse)
    full["loss"].backward()
    torch.testing.assert_close(full["loss"], dense["loss"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h.grad, dense_grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(W.grad, dense_grads[1], rtol=1e-5, atol=1e-7)


def test_temperature_squared_scaling():
    h, W, labels, teacher_logits = _problem(seed=7)
    for T in (1.0, 3.0):
        cfg = LossConfig(kind="forward_kl", temperature=T, kd_weight=0.5)
        sparse = _make_sparse(teacher_logits, k=10, T=T)
        out = chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse)
        torch.testing.assert_close(out["loss"], 0.5 * T**2 * out["kd"])
        # kd itself is the divergence between the *softened* distributions
        _, kd_ref, _ = _ref_loss(h.detach(), W.detach(), labels, cfg, sparse=sparse)
        torch.testing.assert_close(out["kd"].double(), kd_ref, rtol=2e-5, atol=1e-7)


def test_ce_only_equals_cross_entropy():
    h, W, labels, _ = _problem(seed=8)
    cfg = LossConfig(kd_weight=0.0, ce_weight=1.0, chunk_tokens=3)
    out = chunked_lm_head_loss(h, W, labels, cfg)
    h2, W2 = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ W2.T, labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out["loss"], ref)
    out["loss"].backward()
    ref.backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(W.grad, W2.grad)


def test_ignored_positions_are_excluded_from_every_term():
    h, W, labels, teacher_logits = _problem(seed=9)
    cfg = LossConfig(kind="jsd", ce_weight=1.0, chunk_tokens=4)
    sparse = _make_sparse(teacher_logits, k=6, T=1.0)
    out = chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse)
    out["loss"].backward()
    ignored = labels == IGNORE_INDEX
    assert torch.all(h.grad[ignored] == 0) and torch.all(h.grad[~ignored].abs().sum(-1) > 0)
    # Garbage at ignored positions (hidden, teacher targets) changes nothing.
    h_bad = h.detach().clone()
    h_bad[ignored] = 1e4
    bad = SparseTarget(sparse.topk_ids.clone(), sparse.topk_logprobs.clone(), sparse.tail_logmass.clone())
    bad.topk_logprobs[ignored] = 0.0
    bad.tail_logmass[ignored] = math.log(0.7)
    again = chunked_lm_head_loss(h_bad, W, labels, cfg, sparse=bad)
    for key in ("loss", "kd", "ce", "tokens"):
        torch.testing.assert_close(again[key], out[key])
    assert out["tokens"].item() == int((~ignored).sum())


def test_all_ignored_gives_zero_loss_and_zero_grads():
    h, W, labels, teacher_logits = _problem(seed=10)
    labels[:] = IGNORE_INDEX
    out = chunked_lm_head_loss(h, W, labels, LossConfig(ce_weight=1.0), sparse=_make_sparse(teacher_logits, 4, 1.0))
    out["loss"].backward()
    assert out["loss"].item() == 0.0 and out["tokens"].item() == 0
    assert torch.all(h.grad == 0) and torch.all(W.grad == 0)


def test_zero_tail_mass_stays_finite():
    h, W, labels, teacher_logits = _problem(seed=11)
    sparse = _make_sparse(teacher_logits, k=8, T=1.0)
    sparse.tail_logmass.fill_(float("-inf"))
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        h.grad = W.grad = None
        out = chunked_lm_head_loss(h, W, labels, LossConfig(kind=kind), sparse=sparse)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all()


def test_topk_target_tail_is_exact_where_one_minus_sum_cancels():
    """The one top-k producer (precompute and the live HF teacher): ids and log-probs are the float64 top-k, and the
    tail's log-mass is accurate even when it is far below float32's 1 - sum(exp(top-k)) resolution."""
    from megadistil.distill.losses import TAIL_LOGMASS_FLOOR
    from megadistil.distill.targets import topk_target

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=g, dtype=torch.float64)
    logits[:, :4] += torch.tensor([24.0, 23.0, 22.5, 22.0], dtype=torch.float64)  # the rest holds ~1e-9 of the mass
    logp = torch.log_softmax(logits, -1)
    ref_top, ref_ids = logp.topk(4, -1)
    ref_tail = torch.logsumexp(logp[:, 4:], -1)
    target = topk_target(logits.float(), 4)
    assert torch.equal(target.topk_ids, ref_ids)
    torch.testing.assert_close(target.topk_logprobs.double(), ref_top, rtol=0, atol=1e-5)
    torch.testing.assert_close(target.tail_logmass.double(), ref_tail, rtol=1e-4, atol=1e-3)
    assert (1 - target.topk_logprobs.exp().sum(-1)).abs().max() < 1e-6  # what the old tail formula saw
    full = topk_target(logits.float(), 40)
    assert torch.all(full.tail_logmass == TAIL_LOGMASS_FLOOR)


def test_bf16_hidden_close_to_float32():
    h, W, labels, teacher_logits = _problem(seed=12, H=32)
    cfg = LossConfig(kind="forward_kl", ce_weight=0.5, chunk_tokens=8)
    sparse = _make_sparse(teacher_logits, k=8, T=1.0)
    ref = chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse)
    hb, Wb = h.detach().bfloat16().requires_grad_(), W.detach().bfloat16().requires_grad_()
    out = chunked_lm_head_loss(hb, Wb, labels, cfg, sparse=sparse)
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and Wb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=2e-2, atol=0)


# --------------------------------------------------------------------------- memory: never [N, V]


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward run on this thread on CPU)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_llama3_vocab_never_materialises_full_logits():
    N, H, V, chunk = 256, 64, 128_256, 32
    g = torch.Generator().manual_seed(13)
    h = torch.randn(N, H, generator=g).requires_grad_()
    W = (torch.randn(V, H, generator=g) * 0.2).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::17] = IGNORE_INDEX
    teacher_logits = (torch.randn(N, H, generator=g, dtype=torch.float64) @ W.detach().double().T) * 1.5
    cfg = LossConfig(kind="forward_kl", temperature=2.0, ce_weight=0.5, chunk_tokens=chunk)
    sparse = _make_sparse(teacher_logits, k=64, T=cfg.temperature)
    del teacher_logits

    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _LargestTensor() as seen:
        out = chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse)
        out["loss"].backward()
    # Only the inputs are saved: the weight is the one vocabulary-sized tensor, nothing is token x vocab.
    assert (V, H) in saved and all(V not in shape for shape in saved if shape != (V, H))
    # The largest tensor anywhere is one chunk's logits or the [V, H] weight gradient, never [N, V].
    assert seen.largest == max(chunk * V, V * H)
    loss, kd, _, gh, gW = _ref_grads(h, W, labels, cfg, sparse=sparse)
    torch.testing.assert_close(out["loss"].double(), loss, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(out["kd"].double(), kd, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(h.grad.double(), gh, rtol=1e-4, atol=1e-6 * gh.abs().max().item())
    torch.testing.assert_close(W.grad.double(), gW, rtol=1e-4, atol=1e-6 * gW.abs().max().item())


# --------------------------------------------------------------------------- hidden states


def _ref_hidden(student, teacher, mask, mw):
    per_layer = []
    for s, t in zip(student, teacher):
        s, t = s.double()[mask], t.double()[mask]
        ns, nt = s.norm(dim=-1), t.norm(dim=-1)
        per_layer.append((1 - (s * t).sum(-1) / (ns * nt) + mw * (ns - nt) ** 2 / nt**2).mean())
    return torch.stack(per_layer).mean()


def test_hidden_state_loss_zero_for_identical_and_matches_reference():
    g = torch.Generator().manual_seed(14)
    teacher = [torch.randn(2, 5, 12, generator=g) * (i + 1) for i in range(3)]
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    same = hidden_state_loss([t.clone() for t in teacher], teacher, mask, magnitude_weight=0.3)
    assert abs(same.item()) < 1e-6
    student = [(t + torch.randn(t.shape, generator=g)).requires_grad_() for t in teacher]
    for mw in (0.0, 0.3):
        got = hidden_state_loss(student, teacher, mask, magnitude_weight=mw)
        torch.testing.assert_close(got.double(), _ref_hidden(student, teacher, mask, mw), rtol=1e-5, atol=1e-7)
    got.backward()
    assert torch.all(student[0].grad[1, 3:] == 0)  # masked tokens get no gradient
    # Cosine is scale-invariant; only the magnitude term sees a scaled copy.
    scaled = [2 * t for t in teacher]
    assert hidden_state_loss(scaled, teacher, None).item() < 1e-6
    torch.testing.assert_close(hidden_state_loss(scaled, teacher, None, magnitude_weight=0.5), torch.tensor(0.5))


def test_hidden_state_loss_layer_mismatch_names_layer():
    a, b = torch.zeros(2, 4), torch.zeros(2, 5)
    with pytest.raises(ValueError, match="layer 1"):
        hidden_state_loss([a, a], [a, b], None)
    with pytest.raises(ValueError, match="2 student layers vs 1 teacher"):
        hidden_state_loss([a, a], [a], None)


# --------------------------------------------------------------------------- attention relations


def _ref_relation(student_qkv, teacher_qkv, mask, heads, temperature):
    """Row-by-row loops in float64, straight from the MiniLM-v2 definition."""
    total = 0.0
    for s, t in zip(student_qkv, teacher_qkv):
        B, S, W = s.shape
        d = W // heads
        acc, rows = 0.0, 0
        for b in range(B):
            for a in range(heads):
                xs, xt = s[b, :, a * d:(a + 1) * d].double(), t[b, :, a * d:(a + 1) * d].double()
                for i in range(S):
                    if not mask[b, i]:
                        continue
                    keys = [j for j in range(i + 1) if mask[b, j]]
                    ls = torch.log_softmax(xs[keys] @ xs[i] / math.sqrt(d) / temperature, -1)
                    lt = torch.log_softmax(xt[keys] @ xt[i] / math.sqrt(d) / temperature, -1)
                    acc = acc + (lt.exp() * (lt - ls)).sum()
                    rows += 1
        total = total + acc / rows
    return total


def test_attention_relation_loss_matches_reference_with_gqa_widths():
    g = torch.Generator().manual_seed(15)
    B, S, heads = 2, 6, 4
    widths = (16, 8, 8)  # GQA: K and V narrower than Q
    teacher = [torch.randn(B, S, w, generator=g) for w in widths]
    student = [(t + 0.7 * torch.randn(t.shape, generator=g)).requires_grad_() for t in teacher]
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 4:] = False
    for temperature in (1.0, 2.0):
        got = attention_relation_loss(student, teacher, mask, num_relation_heads=heads, temperature=temperature)
        ref = _ref_relation(student, teacher, mask, heads, temperature)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
    got.backward()
    assert all(torch.isfinite(s.grad).all() for s in student)
    assert all(torch.all(s.grad[0, 4:] == 0) for s in student)
    same = attention_relation_loss([t.clone() for t in teacher], teacher, mask, num_relation_heads=heads)
    assert abs(same.item()) < 1e-6


def test_attention_relation_loss_rejects_indivisible_width():
    x = torch.zeros(1, 3, 10)
    with pytest.raises(ValueError, match="student q width 10 is not divisible by 4"):
        attention_relation_loss([x, x, x], [x, x, x], None, num_relation_heads=4)


# --------------------------------------------------------------------------- config and input errors


def test_held_out_loss_keeps_the_divergence_and_drops_the_other_terms():
    run = LossConfig(kind="jsd", jsd_beta=0.3, temperature=2.0, kd_weight=0.4, ce_weight=0.0, hidden_weight=1.0,
                     attn_relation_weight=1.0, dskd_weight=1.0, chunk_tokens=7)
    assert run.held_out(kd=True) == LossConfig(kind="jsd", jsd_beta=0.3, temperature=2.0, kd_weight=1.0,
                                               ce_weight=1.0, chunk_tokens=7)
    assert run.held_out(kd=False).needs() == {}


@pytest.mark.parametrize("change,key", [
    ({"kind": "kl"}, "loss.kind"),
    ({"jsd_beta": 0.0}, "loss.jsd_beta"),
    ({"jsd_beta": 1.0}, "loss.jsd_beta"),
    ({"temperature": 0.0}, "loss.temperature"),
    ({"kd_weight": -1.0}, "loss.kd_weight"),
    ({"ce_weight": float("nan")}, "loss.ce_weight"),
    ({"hidden_weight": -0.1}, "loss.hidden_weight"),
    ({"hidden_magnitude_weight": -0.1}, "loss.hidden_magnitude_weight"),
    ({"attn_relation_weight": float("inf")}, "loss.attn_relation_weight"),
    ({"chunk_tokens": 0}, "loss.chunk_tokens"),
    ({"chunk_tokens": 1.5}, "loss.chunk_tokens"),
    ({"attn_relation_heads": 0}, "loss.attn_relation_heads"),
    ({"attn_relation_temperature": -1.0}, "loss.attn_relation_temperature"),
    ({"hidden_layers": "some"}, "loss.hidden_layers"),
    ({"hidden_layers": []}, "loss.hidden_layers"),
    ({"attn_relation_layers": [1.0]}, "loss.attn_relation_layers"),
    ({"kd_weight": 0.0, "ce_weight": 0.0}, "loss.kd_weight"),
])
def test_bad_config_names_the_key(change, key):
    cfg = dataclasses.replace(LossConfig(), **change)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_default_config_is_valid_and_layers_resolve():
    LossConfig().validate()
    assert resolve_layers("all", 3, "loss.hidden_layers") == [0, 1, 2]
    assert resolve_layers([-1, 0, 2], 4, "loss.hidden_layers") == [0, 2, 3]
    with pytest.raises(ValueError, match=r"loss\.attn_relation_layers: layer 4 out of range"):
        resolve_layers([4], 4, "loss.attn_relation_layers")


def test_bad_inputs_name_the_thing_at_fault():
    h, W, labels, teacher_logits = _problem(seed=16)
    sparse = _make_sparse(teacher_logits, k=4, T=1.0)
    cfg = LossConfig()
    with pytest.raises(ValueError, match="needs a KD target"):
        chunked_lm_head_loss(h, W, labels, cfg)
    bad_ids = SparseTarget(sparse.topk_ids + W.shape[0], sparse.topk_logprobs, sparse.tail_logmass)
    with pytest.raises(ValueError, match=r"sparse\.topk_ids"):
        chunked_lm_head_loss(h, W, labels, cfg, sparse=bad_ids)
    short = SparseTarget(sparse.topk_ids, sparse.topk_logprobs, sparse.tail_logmass[:-1])
    with pytest.raises(ValueError, match=r"sparse\.tail_logmass has 22 tokens"):
        chunked_lm_head_loss(h, W, labels, cfg, sparse=short)
    with pytest.raises(ValueError, match="labels has values outside"):
        chunked_lm_head_loss(h, W, labels.clamp_min(0) + W.shape[0] - 1, cfg, sparse=sparse)
    with pytest.raises(ValueError, match="not both"):
        chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse, teacher_hidden=h, teacher_lm_head_weight=W)
    with pytest.raises(ValueError, match="teacher_lm_head_weight shape"):
        chunked_lm_head_loss(h, W, labels, cfg, teacher_hidden=h.detach(), teacher_lm_head_weight=W[:, :3])
    with pytest.raises(ValueError, match=r"loss\.kind"):
        chunked_lm_head_loss(h, W, labels, LossConfig(kind="x"), sparse=sparse)


# --------------------------------------------------------------------------- the model's output transform

TRANSFORMS = [LogitTransform(softcap=2.5), LogitTransform(scale=1.3, softcap=2.5), LogitTransform(scale=0.4)]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["softcap", "scale+softcap", "scale"])
@pytest.mark.parametrize("target", ["sparse", "dense"])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_logit_transform_matches_float64_reference(kind, beta, target, transform):
    """Student logits transform(h W^T) (and the live teacher's, from its hidden states) in value and gradient: the
    chain rule through the softcap's tanh is in the in-forward gradient."""
    h, W, labels, _ = _problem(seed=4)
    g = torch.Generator().manual_seed(6)
    th, TW = torch.randn(h.shape, generator=g), torch.randn(W.shape, generator=g) * 0.5
    teacher_logits = _ref_transform(th.double() @ TW.double().T, transform)
    assert (h.detach() @ W.detach().T).abs().max() > 2 * 2.5  # deep in the softcap's bend
    cfg = LossConfig(kind=kind, jsd_beta=beta, temperature=1.5, ce_weight=0.3, chunk_tokens=5)
    if target == "sparse":
        targets = {"sparse": _make_sparse(teacher_logits, k=6, T=cfg.temperature)}
        ref = _ref_grads(h, W, labels, cfg, transform=transform, **targets)
    else:
        targets = {"teacher_hidden": th, "teacher_lm_head_weight": TW}
        ref = _ref_grads(h, W, labels, cfg, transform=transform, teacher_logits=teacher_logits)
    out = chunked_lm_head_loss(h, W, labels, cfg, logit_transform=transform, **targets)
    _assert_matches_ref(out, h, W, ref)
    without = chunked_lm_head_loss(h.detach(), W.detach(), labels, cfg, **targets)
    assert not torch.allclose(without["loss"].double(), ref[0], rtol=1e-2)  # the transform is not a no-op here


# --------------------------------------------------------------------------- ULD, KD masks, per-token weights


def _ref_uld(h, W, labels, cfg, *, teacher_probs=None, sparse=None, kd_mask=None, weights=None):
    """ULD from its definition in float64: the r-th largest probabilities of student and teacher paired; with a
    top-k + tail target, the student's k largest plus its remaining mass against the teacher's k plus its tail."""
    z = h.double() @ W.double().T
    q = torch.softmax(z / cfg.temperature, -1)
    q_sorted = q.sort(-1, descending=True).values
    if sparse is not None:
        k = sparse.topk_logprobs.shape[-1]
        p_top = sparse.topk_logprobs.double().exp().sort(-1, descending=True).values
        P = torch.cat([p_top, sparse.tail_logmass.double().exp()[:, None]], -1)
        Q = torch.cat([q_sorted[:, :k], 1 - q_sorted[:, :k].sum(-1, keepdim=True)], -1)
    else:
        P, Q = teacher_probs.sort(-1, descending=True).values, q_sorted
    kd = (Q - P).abs().sum(-1)
    ce = F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = labels != IGNORE_INDEX
    has_kd = valid & (kd_mask if kd_mask is not None else torch.ones_like(valid))
    w = weights.double() if weights is not None else torch.ones_like(kd)
    kd_mean = (w * kd)[has_kd].sum() / has_kd.sum()
    ce_mean = (w * ce)[valid].sum() / valid.sum()
    return cfg.kd_weight * cfg.temperature**2 * kd_mean + cfg.ce_weight * ce_mean, kd_mean, ce_mean


def _ref_uld_grads(h, W, labels, cfg, **kw):
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    loss, kd, ce = _ref_uld(h64, W64, labels, cfg, **kw)
    loss.backward()
    return loss.detach(), kd.detach(), ce.detach(), h64.grad, W64.grad


def test_uld_sparse_matches_its_definition_in_float64():
    h, W, labels, teacher_logits = _problem(seed=11)
    cfg = LossConfig(kind="uld", temperature=1.5, kd_weight=0.8, ce_weight=0.3, chunk_tokens=6)
    sparse = _make_sparse(teacher_logits, k=8, T=cfg.temperature)
    # The ids of a target from another tokenizer mean nothing to the student: ULD never reads them.
    foreign = SparseTarget(sparse.topk_ids + 1000, sparse.topk_logprobs.flip(-1), sparse.tail_logmass)
    ref = _ref_uld_grads(h, W, labels, cfg, sparse=sparse)
    _assert_matches_ref(chunked_lm_head_loss(h, W, labels, cfg, sparse=foreign), h, W, ref)


def test_uld_dense_matches_its_definition_in_float64():
    h, W, labels, _ = _problem(seed=12)
    g = torch.Generator().manual_seed(13)
    th, TW = torch.randn(h.shape, generator=g), torch.randn(W.shape, generator=g)
    cfg = LossConfig(kind="uld", temperature=2.0, ce_weight=0.5, chunk_tokens=5)
    teacher_probs = torch.softmax(th.double() @ TW.double().T / cfg.temperature, -1)
    ref = _ref_uld_grads(h, W, labels, cfg, teacher_probs=teacher_probs)
    _assert_matches_ref(chunked_lm_head_loss(h, W, labels, cfg, teacher_hidden=th, teacher_lm_head_weight=TW),
                        h, W, ref)


def test_uld_is_zero_for_a_permuted_copy_of_the_student():
    """Tokenizer-free: a teacher whose distribution is the student's with the vocabulary relabelled costs nothing."""
    h, W, labels, _ = _problem(seed=14)
    cfg = LossConfig(kind="uld", chunk_tokens=8)
    perm = torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(0))
    out = chunked_lm_head_loss(h, W, labels, cfg, teacher_hidden=h.detach(), teacher_lm_head_weight=W.detach()[perm])
    assert out["kd"].item() < 1e-6
    kl = chunked_lm_head_loss(h, W, labels, dataclasses.replace(cfg, kind="forward_kl"), teacher_hidden=h.detach(),
                              teacher_lm_head_weight=W.detach()[perm])
    assert kl["kd"].item() > 0.1  # forward KL does compare ids


def test_kd_mask_takes_kd_only_where_a_target_exists():
    h, W, labels, teacher_logits = _problem(seed=15)
    cfg = LossConfig(kind="uld", ce_weight=0.6, chunk_tokens=4)
    sparse = _make_sparse(teacher_logits, k=6, T=1.0)
    mask = torch.ones(labels.shape, dtype=torch.bool)
    mask[[0, 5, 6, 17]] = False
    bad = SparseTarget(sparse.topk_ids, sparse.topk_logprobs.clone(), sparse.tail_logmass.clone())
    bad.topk_logprobs[~mask] = float("nan")  # placeholder rows: nothing of them may reach the loss
    ref = _ref_uld_grads(h, W, labels, cfg, sparse=sparse, kd_mask=mask)
    out = chunked_lm_head_loss(h, W, labels, cfg, sparse=bad, kd_mask=mask)
    valid = labels != IGNORE_INDEX
    assert out["kd_tokens"].item() == int((mask & valid).sum()) < out["tokens"].item()
    _assert_matches_ref(out, h, W, ref)


def test_token_weights_multiply_kd_and_ce():
    h, W, labels, teacher_logits = _problem(seed=16)
    cfg = LossConfig(kind="uld", kd_weight=0.9, ce_weight=0.4, chunk_tokens=5)
    sparse = _make_sparse(teacher_logits, k=7, T=1.0)
    w = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) * 3
    w[3] = 0.0
    ref = _ref_uld_grads(h, W, labels, cfg, sparse=sparse, weights=w)
    _assert_matches_ref(chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse, token_weights=w), h, W, ref)


@pytest.mark.parametrize("kind", ["forward_kl", "uld"])
def test_weights_of_one_reproduce_unweighted_training_bitwise(kind):
    h, W, labels, teacher_logits = _problem(seed=17)
    cfg = LossConfig(kind=kind, ce_weight=0.5, chunk_tokens=6)
    sparse = _make_sparse(teacher_logits, k=9, T=1.0)
    runs = []
    for extra in ({}, {"token_weights": torch.ones(labels.shape)},
                  {"token_weights": torch.ones(labels.shape), "kd_mask": torch.ones(labels.shape, dtype=torch.bool)}):
        h.grad = W.grad = None
        out = chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse, **extra)
        out["loss"].backward()
        runs.append((out["loss"].detach(), out["kd"], out["ce"], h.grad.clone(), W.grad.clone()))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_per_token_inputs_are_checked():
    h, W, labels, teacher_logits = _problem(seed=18)
    sparse = _make_sparse(teacher_logits, k=4, T=1.0)
    cfg = LossConfig(kind="uld")
    with pytest.raises(ValueError, match="kd_mask has 5 tokens"):
        chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse, kd_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_weights must be finite and >= 0"):
        chunked_lm_head_loss(h, W, labels, cfg, sparse=sparse, token_weights=-torch.ones(labels.shape))
    foreign = SparseTarget(sparse.topk_ids + 1000, sparse.topk_logprobs, sparse.tail_logmass)
    with pytest.raises(ValueError, match="ids outside"):  # an id-matching divergence refuses another vocabulary
        chunked_lm_head_loss(h, W, labels, LossConfig(kind="forward_kl"), sparse=foreign)


def _ref_masked_divergence(kind, beta, P, Q, kept):
    """The divergence over the kept buckets only (a hole is no bucket: p = q = 0 there, and so is its term)."""
    one = torch.ones_like(P)
    P, Q = torch.where(kept, P, one), torch.where(kept, Q, one)  # finite logs (and gradients) at the holes
    if kind == "forward_kl":
        term = P * (P.log() - Q.log())
    elif kind == "reverse_kl":
        term = Q * (Q.log() - P.log())
    else:
        M = beta * P + (1 - beta) * Q
        term = beta * P * (P.log() - M.log()) + (1 - beta) * Q * (Q.log() - M.log())
    return (term * kept).sum(-1)


def _merge_holes(sparse: SparseTarget, present: torch.Tensor):
    """The reference's view of a target with holes: the kept entries as buckets, the dropped ones' mass in the tail."""
    p_top = sparse.topk_logprobs.double().exp() * present
    tail = sparse.tail_logmass.double().exp() + (sparse.topk_logprobs.double().exp() * ~present).sum(-1)
    return p_top, tail


@pytest.mark.parametrize("kind,beta", KINDS)
def test_a_target_with_holes_matches_float64_reference(kind, beta):
    """Entries of another tokenizer's top-k that have no student token are holes: their mass is in the tail, their id
    repeats a kept one, and the loss equals KD over the kept buckets + tail computed in float64."""
    from megadistil.distill.targets import mapped_targets

    h, W, labels, teacher_logits = _problem(seed=19)
    cfg = LossConfig(kind=kind, jsd_beta=beta, temperature=1.5, ce_weight=0.3, chunk_tokens=6)
    # a teacher over 70 ids, 50 of which map onto the student's 50 (shuffled), 20 onto nothing
    g = torch.Generator().manual_seed(3)
    vmap = torch.cat([torch.randperm(50, generator=g), torch.full((20,), -1)])[torch.randperm(70, generator=g)]
    t_logits = torch.cat([teacher_logits, torch.randn(teacher_logits.shape[0], 20, generator=g, dtype=torch.float64)], -1)
    teacher = _make_sparse(t_logits, k=10, T=cfg.temperature)
    mapped, has_any = mapped_targets(teacher, vmap)
    present = mapped.present
    assert has_any.all() and (~present).any() and present.sum(-1).min() >= 1
    p_top, p_tail = _merge_holes(teacher, present)
    # float64 reference: student buckets at the mapped ids (kept entries) + its remaining mass
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    z = h64 @ W64.T
    q = torch.softmax(z / cfg.temperature, -1)
    q_top = q.gather(-1, vmap[teacher.topk_ids].clamp_min(0)) * present
    P = torch.cat([p_top, p_tail[:, None]], -1)
    Q = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    kd_ref = _ref_masked_divergence(kind, beta, P, Q, torch.cat([present, torch.ones_like(present[:, :1])], -1))
    ce = F.cross_entropy(z, labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = labels != IGNORE_INDEX
    loss_ref = (cfg.kd_weight * cfg.temperature**2 * kd_ref + cfg.ce_weight * ce)[valid].mean()
    loss_ref.backward()
    ref = (loss_ref.detach(), kd_ref[valid].mean().detach(), ce[valid].mean().detach(), h64.grad, W64.grad)
    _assert_matches_ref(chunked_lm_head_loss(h, W, labels, cfg, sparse=mapped), h, W, ref)


def test_a_target_without_holes_is_bitwise_the_plain_one():
    """present all True (a tokenizer whose every top-k token the student has) changes nothing, bit for bit."""
    h, W, labels, teacher_logits = _problem(seed=20)
    sparse = _make_sparse(teacher_logits, k=8, T=1.0)
    full = SparseTarget(sparse.topk_ids, sparse.topk_logprobs, sparse.tail_logmass, torch.ones_like(sparse.topk_ids,
                                                                                                   dtype=torch.bool))
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        cfg = LossConfig(kind=kind, ce_weight=0.5, chunk_tokens=5)
        results = []
        for target in (sparse, full):
            h.grad = W.grad = None
            out = chunked_lm_head_loss(h, W, labels, cfg, sparse=target)
            out["loss"].backward()
            results.append((out["loss"].detach(), h.grad.clone(), W.grad.clone()))
        assert all(torch.equal(a, b) for a, b in zip(*results)), kind
