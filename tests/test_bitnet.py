import copy
import re

import pytest
import torch
import torch.nn.functional as F
from _tiny import tiny_llama31
from torch import nn

from megadistil.bitnet import (
    BitLinear,
    bitlinear_modules,
    pack_ternary,
    set_quant_lambda,
    teacher_mode,
    ternary_codes,
    to_bitnet,
    unpack_ternary,
)


def _ids(vocab=256, shape=(2, 24), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_mode_reproduces_original_logits_exactly(dtype):
    model = tiny_llama31(dtype=dtype)
    original = copy.deepcopy(model)
    ids = _ids()
    to_bitnet(model, lora_rank=8, subln=True)
    with torch.no_grad():
        expected = original(ids).logits
        with teacher_mode(model):
            got = model(ids).logits
        student = model(ids).logits
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    assert not torch.allclose(student.float(), expected.float(), atol=1e-2)  # student mode really is different
    assert all(not m.teacher for m in model.modules() if isinstance(m, BitLinear))  # the context restored


def test_conversion_covers_decoder_linears_only_and_shares_weights():
    model = tiny_llama31()
    weights = {n: p for n, p in model.named_parameters()}
    to_bitnet(model, lora_rank=4)
    converted = {n for n, m in model.named_modules() if isinstance(m, BitLinear)}
    assert len(converted) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(model.lm_head) is nn.Linear and isinstance(model.model.embed_tokens, nn.Embedding)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight is weights["model.layers.0.self_attn.q_proj.weight"]  # adopted, not copied
    assert not q.weight.requires_grad and not q.delta.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("lora_A", "lora_B")) or "embed" in n or "norm" in n or "lm_head" in n for n in trainable)


def test_student_matches_transformers_autobitlinear():
    """With B = 0 the student is transformers' online-quantized AutoBitLinear on the same weights.

    Tolerance 1e-4 absolute on logits of magnitude ~1: the math is identical, but transformers sums dequantized floats
    while we sum integer codes exactly and scale once, so results differ by float32 rounding (~1e-6 relative per
    layer), occasionally amplified when that rounding flips one int8 activation code (one step = max|x|/127).
    """
    from transformers.integrations.bitnet import AutoBitLinear

    model = tiny_llama31()
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if type(module) is nn.Linear and name != "lm_head":
            layer = AutoBitLinear(module.in_features, module.out_features, bias=False, online_quant=True)
            layer.weight = module.weight
            reference.set_submodule(name, layer)
    to_bitnet(model, lora_rank=8)
    ids = _ids()
    torch._dynamo.config.disable = True  # transformers wraps its quantizers in torch.compile: same math, eager is faster here
    try:
        with torch.no_grad():
            expected, got = reference(ids).logits, model(ids).logits
    finally:
        torch._dynamo.config.disable = False
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def _random_layer(subln: bool, backward: str, seed: int = 0) -> BitLinear:
    torch.manual_seed(seed)
    layer = BitLinear(96, 64, lora_rank=8, lora_alpha=16, subln=subln, backward=backward)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.delta.normal_(0, 0.01)
        layer.lora_B.normal_(0, 0.05)  # B != 0 so that dA is not trivially zero
        if subln:
            layer.sub_norm.weight.uniform_(0.5, 1.5)
    return layer


def _reference(layer: BitLinear, x: torch.Tensor):
    """The same fake-quant math in float64 with plain autograd and straight-through estimators."""
    A = layer.lora_A.detach().double().requires_grad_()
    B = layer.lora_B.detach().double().requires_grad_()
    x = x.detach().double().requires_grad_()
    h = x
    gamma = None
    if layer.sub_norm is not None:
        gamma = layer.sub_norm.weight.detach().double().requires_grad_()
        h = gamma * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + layer.sub_norm.eps)
    sx = 127 / h.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    hq = h + ((h * sx).round().clamp(-128, 127) / sx - h).detach()
    w = layer.weight.double() + layer.delta.double() + layer.scaling * B @ A
    sw = 1 / w.abs().mean().clamp(min=1e-5)
    wq = w + ((w * sw).round().clamp(-1, 1) / sw - w).detach()
    return hq @ wq.t(), {"x": x, "A": A, "B": B, "gamma": gamma, "h": h, "wq": (w * sw).round().clamp(-1, 1) / sw}


def _grads(layer, x, upstream):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * upstream).sum().backward()
    return y, x.grad


def test_bf16_mode_gradients_match_float64_reference():
    layer = _random_layer(subln=True, backward="bf16")
    x = torch.randn(3, 10, 96)
    upstream = torch.randn(3, 10, 64)
    y, grad_x = _grads(layer, x, upstream)
    y_ref, ref = _reference(layer, x)
    (y_ref * upstream.double()).sum().backward()
    tol = {"rtol": 1e-4, "atol": 1e-5}  # float32 rounding of sums of ~100 terms
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(grad_x.double(), ref["x"].grad, **tol)
    torch.testing.assert_close(layer.lora_A.grad.double(), ref["A"].grad, **tol)
    torch.testing.assert_close(layer.lora_B.grad.double(), ref["B"].grad, **tol)
    torch.testing.assert_close(layer.sub_norm.weight.grad.double(), ref["gamma"].grad, **tol)
    assert layer.weight.grad is None and layer.delta.grad is None


@pytest.mark.parametrize("grad_size", [1.0, 1e-7, 1e-25])
def test_int8_mode_input_gradient_within_derived_bound(grad_size):
    """dx = Q8(g)·Ŵ. Per-row absmax rounding moves each g_io by at most max_o|g_io|/254, so
    |dx_ij − (g·Ŵ)_ij| ≤ max_o|g_io|/254 · Σ_o |Ŵ_oj|, at every gradient size: real gradients are ~1e-7 (a mean
    loss over many tokens), far below the activations' 1e-5 floor, which made such rows coarse or 0. The LoRA
    gradients do not involve Q8(g): float rounding only."""
    layer = _random_layer(subln=False, backward="int8")
    x = torch.randn(4, 12, 96)
    upstream = torch.randn(4, 12, 64) * grad_size
    _, grad_x = _grads(layer, x, upstream)
    y_ref, ref = _reference(layer, x)
    (y_ref * upstream.double()).sum().backward()
    g = upstream.double().reshape(-1, 64)
    bound = g.abs().amax(-1, keepdim=True) / 254 * ref["wq"].abs().sum(0, keepdim=True)
    err = (grad_x.double().reshape(-1, 96) - ref["x"].grad.reshape(-1, 96)).abs()
    assert (err <= bound * (1 + 1e-4) + 1e-6 * grad_size).all(), (err / bound).max()
    assert err.max() > 0  # it really did quantize
    assert (err / ref["x"].grad.abs().reshape(-1, 96).clamp(min=1e-3 * grad_size)).median() < 0.05
    torch.testing.assert_close(layer.lora_A.grad.double(), ref["A"].grad, rtol=1e-4, atol=1e-5 * grad_size)
    torch.testing.assert_close(layer.lora_B.grad.double(), ref["B"].grad, rtol=1e-4, atol=1e-5 * grad_size)


def _activation_bytes(fn, x, params):
    """Bytes of the tensors autograd saves for backward, parameters excluded (they are not activation memory)."""
    param_ptrs = {p.data_ptr() for p in params}
    saved = {}

    def pack(t):
        if t.data_ptr() not in param_ptrs:
            saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(saved.values())


def test_saved_activation_bytes_at_most_055_of_bf16_linear_plus_lora():
    tokens, d_in, d_out, r = 512, 1024, 1024, 16
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
    layer = BitLinear(d_in, d_out, lora_rank=r, dtype=torch.bfloat16)
    layer.weight.data.normal_()
    W = torch.randn(d_out, d_in, dtype=torch.bfloat16)
    A = torch.randn(r, d_in, dtype=torch.bfloat16, requires_grad=True)
    B = torch.zeros(d_out, r, dtype=torch.bfloat16, requires_grad=True)

    def linear_plus_lora(inp):
        return F.linear(inp, W) + F.linear(F.linear(inp, A), B)

    ours = _activation_bytes(layer, x, list(layer.parameters()))
    baseline = _activation_bytes(linear_plus_lora, x, [W, A, B])
    assert baseline >= tokens * d_in * 2  # it saves the bf16 input
    assert ours == tokens * d_in + tokens * 4 + 4  # int8 codes + a float32 scale per token + W_eff's scale
    assert ours / baseline <= 0.55


def test_keep_weight_codes_under_checkpointing_gives_identical_gradients():
    from torch.utils.checkpoint import checkpoint

    results = []
    for keep in (False, True):
        layer = _random_layer(subln=False, backward="int8")
        layer.keep_weight_codes = keep
        x = torch.randn(2, 8, 96, generator=torch.Generator().manual_seed(3), requires_grad=True)
        checkpoint(layer, x, use_reentrant=False).square().sum().backward()
        results.append((x.grad, layer.lora_A.grad, layer.lora_B.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_backward_forms_each_block_of_w_eff_once_with_the_forwards_scale(monkeypatch):
    """Without kept codes the backward forms W_eff once (the codes pass, at the forward's scale): the forward forms
    4 blocks for the absmean and 3 again for the codes (the last is at hand), the backward 4; the gradients are
    those of kept codes bit for bit."""
    from megadistil.bitnet import linear

    monkeypatch.setitem(linear.ROW_BLOCK_NUMEL, "cpu", 64 * 96)  # blocks of 64 rows: 4 for 256 output features
    formed = []
    effective_rows = linear._effective_rows
    monkeypatch.setattr(linear, "_effective_rows",
                        lambda rows, *args: formed.append(rows) or effective_rows(rows, *args))
    grads = []
    for keep in (False, True):
        torch.manual_seed(0)
        layer = BitLinear(96, 256, lora_rank=8)
        layer.keep_weight_codes = keep
        with torch.no_grad():
            layer.weight.normal_(0, 0.05)
            layer.lora_B.normal_(0, 0.05)
        x = torch.randn(2, 8, 96, generator=torch.Generator().manual_seed(3), requires_grad=True)
        formed.clear()
        y = layer(x)
        forward = len(formed)
        y.square().sum().backward()
        assert (forward, len(formed) - forward) == (7, 0 if keep else 4)
        grads.append((x.grad, layer.lora_A.grad, layer.lora_B.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_quant_lambda_warmup_blends_from_float_to_quantized():
    layer = _random_layer(subln=False, backward="bf16")
    x = torch.randn(5, 96)
    with torch.no_grad():
        quantized = layer(x)
        set_quant_lambda(layer, 0.0)
        unquantized = layer(x)
        set_quant_lambda(layer, 0.5)
        half = layer(x)
    torch.testing.assert_close(unquantized, F.linear(x, layer.effective_weight()))
    assert not torch.allclose(half, unquantized) and not torch.allclose(half, quantized)
    with pytest.raises(ValueError, match="λ"):
        set_quant_lambda(layer, 1.5)


def test_packing_matches_transformers_layout():
    from transformers.integrations.bitnet import pack_weights

    codes, _ = ternary_codes(torch.randn(64, 24))
    packed = pack_ternary(codes)
    assert packed.shape == (16, 24) and packed.dtype == torch.uint8
    assert torch.equal(packed, pack_weights(codes.clone().to(torch.int32)))
    assert torch.equal(unpack_ternary(packed), codes)


def test_any_model_built_of_linear_converts():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    to_bitnet(model, lora_rank=4, exclude=())
    assert all(isinstance(model[i], BitLinear) for i in (0, 2))
    model(torch.randn(3, 16)).sum().backward()
    assert model[2].lora_B.grad is not None


def test_meta_device_conversion_allocates_nothing():
    with torch.device("meta"):
        model = tiny_llama31()
    to_bitnet(model, lora_rank=4)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_bad_input_errors_name_the_fault():
    with pytest.raises(ValueError, match="'bitnet.lora_rank': must be >= 1, got 0"):
        to_bitnet(tiny_llama31(), lora_rank=0)
    with pytest.raises(ValueError, match=r"lora_rank=100 exceeds layer 'model.layers.0.self_attn.q_proj'"):
        to_bitnet(tiny_llama31(), lora_rank=100)
    with pytest.raises(ValueError, match="no nn.Linear layers to convert"):
        to_bitnet(nn.Sequential(nn.Embedding(10, 4)), lora_rank=2)
    odd = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))
    with pytest.raises(ValueError, match=r"layer '1' has out_features=6, not divisible by 4"):
        to_bitnet(odd, lora_rank=2, exclude=())
    assert type(odd[0]) is nn.Linear  # validation runs before any layer is replaced
    with pytest.raises(ValueError, match="bitnet.backward"):
        to_bitnet(tiny_llama31(), lora_rank=2, backward="fp8")
    with pytest.raises(ValueError, match="exclude entry 'q_projj' matches no module of LlamaForCausalLM"):
        to_bitnet(tiny_llama31(), lora_rank=2, exclude=("q_projj",))


def test_weight_matrices_outside_linear_layers_are_refused_unless_excluded():
    """A mixture-of-experts keeps its experts as 3-D parameters (transformers 5) and routes with a non-Linear gate:
    converting only the nn.Linear layers left most of the weights in full precision, silently."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, num_local_experts=4, vocab_size=300)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    with pytest.raises(ValueError, match=r"6 weight matrices outside nn.Linear layers, which would stay in full "
                                         r"precision: model.layers.0.mlp.gate.weight, model.layers.0.mlp.experts"):
        to_bitnet(model, lora_rank=2)
    to_bitnet(model, lora_rank=2, exclude=("gate", "experts"))  # kept in full precision on purpose
    assert sum(isinstance(m, BitLinear) for m in model.modules()) == 8  # q, k, v, o of both layers


def _rand(g: torch.Generator, dtype: torch.dtype, *shape: int, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * std).to(dtype)


def _weight_cases():
    """(W, ΔW, A, B, scaling, ΔW's row scale) for each way W_eff is formed: float32 or bf16 factors, no ΔW, ΔW in the
    model dtype or int8 with a row scale, LoRA scaling 1 or not (a fused multiply-add would change the bits)."""
    from megadistil.bitnet.linear import int8_rows

    g = torch.Generator().manual_seed(3)
    cases = []
    for dtype, delta, scaling in ((torch.float32, None, 0.5), (torch.float32, "dtype", 1.0),
                                  (torch.float32, "int8", 0.37), (torch.bfloat16, "dtype", 0.5),
                                  (torch.bfloat16, "int8", 1.0)):
        w, a, b, d, ds = (_rand(g, dtype, 320, 192, std=0.02), _rand(g, dtype, 8, 192, std=0.1),
                          _rand(g, dtype, 320, 8, std=0.01), None, None)
        if delta == "dtype":
            d = _rand(g, dtype, 320, 192, std=0.005)
        elif delta == "int8":
            d, ds = int8_rows(torch.randn(320, 192, generator=g) * 0.005, dtype)
        cases.append((w, d, a, b, scaling, ds))
    return cases


def test_compiled_quantizers_give_the_eager_codes_and_outputs(monkeypatch):
    """compile_quantizers fuses the activation quantizer, W_eff's formation (Σ|W_eff|, then the codes, a block of rows
    at a time) and the product's epilogue. Against the eager path: the same int8 codes, the same ternary codes (given
    the same scale, bit for bit; the scale itself sums in another order: equal to float32 rounding), and a BitLinear
    that computes the same outputs and gradients bit for bit."""
    from megadistil.bitnet import compile_quantizers, int8_codes, linear
    from megadistil.bitnet.quant import quantizers_compiled

    monkeypatch.setitem(linear.ROW_BLOCK_NUMEL, "cpu", 64 * 192)  # 5 blocks of 64 rows
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)  # never eager in disguise
    x = torch.randn(33, 96)
    cases = _weight_cases()
    layer = _random_layer(subln=True, backward="int8")
    inputs = torch.randn(5, 7, 96, requires_grad=True)

    def run():
        codes = [linear.weight_codes(*case) for case in cases]
        y = layer(inputs)
        grads = torch.autograd.grad(y.square().sum(), (inputs, layer.lora_A, layer.lora_B))
        return int8_codes(x), ternary_codes(x), codes, y, grads

    eager = run()
    compile_quantizers()
    try:
        assert quantizers_compiled()
        compiled = run()
        again = [linear.weight_codes(*case, scale=scale) for case, (_, scale) in zip(cases, eager[2])]
    finally:
        compile_quantizers(False)
    for (c0, s0), (c1, s1) in zip(eager[:2], compiled[:2]):
        assert torch.equal(c0, c1)
        torch.testing.assert_close(s0, s1, rtol=1e-6, atol=0)
    for (c0, s0), (c1, s1), (c2, _) in zip(eager[2], compiled[2], again, strict=True):
        torch.testing.assert_close(s1, s0, rtol=2 ** -23, atol=0)
        assert torch.equal(c2, c0)
        assert (c1 != c0).sum() <= 1  # only a weight at a rounding boundary can follow the scale's last bit
    assert torch.equal(compiled[3], eager[3])
    for g0, g1 in zip(eager[4], compiled[4], strict=True):
        assert torch.equal(g0, g1)


def test_weight_codes_are_the_absmean_codes_of_the_whole_effective_weight(monkeypatch):
    """weight_codes forms W + ΔW + s·B·A a block of rows at a time (twice: absmean, then codes), in one block or
    many, for every ΔW format: its scale is 1 / the float64 absmean of W_eff to float32 rounding (two roundings:
    mean, 1/mean; transformers' float32 mean within 1e-6), and its codes are exactly round(W_eff · scale) of the
    whole float32 W_eff that effective_weight (the export's and the merge's) gives."""
    from megadistil.bitnet import linear
    from megadistil.bitnet.linear import effective_weight, int8_rows, weight_codes

    g = torch.Generator().manual_seed(0)
    for out, inp, dtype in ((160, 96, torch.bfloat16), (256, 48, torch.float32), (200, 120, torch.bfloat16)):
        w = (torch.randn(out, inp, generator=g) * 0.02).to(dtype)
        a, b = torch.randn(8, inp, generator=g).to(dtype), torch.randn(out, 8, generator=g).to(dtype) * 0.01
        delta = (torch.randn(out, inp, generator=g) * 0.003).to(dtype)
        codes, row_scale = int8_rows(delta.float(), dtype)
        for d, d_scale in ((None, None), (delta, None), (codes, row_scale)):
            for block_numel, n_blocks in ((1 << 30, 1), (1, -(-out // 64))):  # whole; blocks of 64 rows (the least)
                monkeypatch.setitem(linear.ROW_BLOCK_NUMEL, "cpu", block_numel)
                assert len(linear.row_blocks(w)) == n_blocks
                got_codes, scale = weight_codes(w, d, a, b, 0.5, d_scale)
                w_eff = effective_weight(w, d, a, b, 0.5, d_scale)
                assert abs(1 / scale.item() / w_eff.double().abs().mean().item() - 1) < 2.5e-7, (out, dtype, n_blocks)
                torch.testing.assert_close(scale, 1 / w_eff.abs().mean(), rtol=1e-6, atol=0)
                assert torch.equal(got_codes, (w_eff * scale).round().clamp(-1, 1).to(torch.int8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_lora_product_is_rounded_to_bf16_and_float32_factors_are_not(dtype):
    """bf16 factors form s·B·A in a bf16 GEMM (rounded once to bf16: within 2^-8 of |s·B·A| plus float32
    rounding of the float64 value), float32 ones in a float32 GEMM (float32 rounding only), in the forward's W_eff
    and the merge's ΔW + s·B·A alike; the bf16 rounding must show, so the test sees which path ran; the codes are
    those of effective_weight's W_eff either way."""
    from megadistil.bitnet.linear import effective_weight, merged_delta, weight_codes

    g = torch.Generator().manual_seed(3)
    w = (torch.randn(256, 96, generator=g) * 0.02).to(dtype)
    delta = (torch.randn(256, 96, generator=g) * 0.003).to(dtype)
    a, b = torch.randn(8, 96, generator=g).to(dtype), (torch.randn(256, 8, generator=g) * 0.01).to(dtype)
    lora, lora_terms = 0.5 * (b.double() @ a.double()), 0.5 * (b.double().abs() @ a.double().abs())
    for got, exact, size in ((effective_weight(w, delta, a, b, 0.5), w.double() + (delta.double() + lora),
                              w.double().abs() + delta.double().abs()),
                             (merged_delta(delta, a, b, 0.5), delta.double() + lora, delta.double().abs())):
        # float32: a rounding per add and per product term (8 of them), each within 2^-24 of what it rounds
        err, float32_bound = (got.double() - exact).abs(), 2.0 ** -24 * (3 * (size + lora.abs()) + 10 * lora_terms)
        if dtype == torch.bfloat16:
            assert torch.all(err <= lora.abs() * 2.0 ** -8 + float32_bound)
            assert torch.any(err > float32_bound)
        else:
            assert torch.all(err <= float32_bound)
    codes, scale = weight_codes(w, delta, a, b, 0.5)
    assert torch.equal(codes, (effective_weight(w, delta, a, b, 0.5) * scale).round().clamp(-1, 1).to(torch.int8))


def test_weight_codes_keep_only_block_sized_float32_buffers(monkeypatch):
    """Nothing W-sized in float32: the two reused buffers hold one block of rows; buffers first made under
    inference_mode still serve a training step."""
    from megadistil.bitnet import linear
    from megadistil.bitnet.linear import _SCRATCH, weight_codes

    monkeypatch.setitem(linear.ROW_BLOCK_NUMEL, "cpu", 1 << 14)
    _SCRATCH.clear()
    w, a, b = torch.randn(512, 128), torch.randn(4, 128), torch.zeros(512, 4)
    with torch.inference_mode():
        weight_codes(w, None, a, b, 1.0)
    codes, _ = weight_codes(w, torch.zeros_like(w), a.requires_grad_(), b.requires_grad_(), 1.0)
    assert codes.shape == w.shape
    assert sorted(buf.numel() for buf in _SCRATCH.values()) == [128 * 128, 128 * 128]  # 128 rows of 128, not 512
    _SCRATCH.clear()


def test_merge_then_reset_leaves_student_output_bitwise_unchanged():
    layer = _random_layer(subln=True, backward="int8")
    x = torch.randn(4, 96)
    with torch.no_grad():
        before = layer(x)
        layer.merge_lora_()
        layer.reset_lora(torch.Generator().manual_seed(5))
        after = layer(x)
    assert torch.equal(before, after)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0


def test_frozen_weight_codes_give_the_same_logits_and_quantize_once():
    """Inside frozen_weight_codes the student's logits are bitwise those of the plain forward (the same codes, the
    same product), the weights are quantized at the first forward only (a change to B inside is not seen), and on
    exit the layers quantize every forward again."""
    from megadistil.bitnet import frozen_weight_codes

    model = tiny_llama31()
    to_bitnet(model, lora_rank=8, subln=True)
    ids = _ids()
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B.normal_(0, 0.05)
        plain = model(ids).logits
        with frozen_weight_codes(model):
            frozen = model(ids).logits
            q.lora_B.mul_(3.0)
            stale = model(ids).logits
        moved = model(ids).logits
    assert torch.equal(frozen, plain) and torch.equal(stale, plain)
    assert not torch.equal(moved, plain)
    assert all(not m.codes_frozen and m._frozen_codes is None for m in model.modules() if isinstance(m, BitLinear))


def test_int8_delta_holds_the_merge_to_half_a_step_per_row_and_a_merge_moves_logits_little():
    """relora.delta_format=int8: ΔW is int8 codes and a per-row scale (a quarter of a float32 ΔW's bytes). After a
    merge every element is within half its row's step of the float32 merged value, and the merge moves the model's
    logits by at most 3 % of the largest (measured: ~2.1 %, a bf16 ΔW ~1.1 %, a float32 ΔW 0)."""
    from megadistil.bitnet.linear import merged_delta

    ids = _ids()
    torch.manual_seed(0)
    model = tiny_llama31()
    to_bitnet(model, lora_rank=8, delta_format="int8")
    layers = [layer for _, layer in bitlinear_modules(model)]
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_(0, 0.02)
        before = model(ids).logits
        merged = [merged_delta(la.delta, la.lora_A, la.lora_B, la.scaling, la.delta_scale) for la in layers]
        for layer in layers:
            layer.merge_lora_()
            layer.reset_lora()
        after = model(ids).logits
    for layer, value in zip(layers, merged, strict=True):
        assert layer.delta.dtype == torch.int8 and layer.delta_scale.shape == (layer.out_features, 1)
        stored = layer.delta.float() * layer.delta_scale
        assert torch.all((stored - value).abs() <= layer.delta_scale / 2 * (1 + 1e-5) + 1e-12)
        assert torch.equal(layer.delta_scale.squeeze(1), value.abs().amax(dim=1) / 127)
    change = float((after - before).abs().max() / before.abs().max())
    assert 0 < change <= 0.03, change


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_trained_bias_gets_the_sum_of_the_output_gradient_at_full_quantization(dtype):
    """optim.param_groups may train a BitLinear's bias (a Qwen2 student's q/k/v ones): the λ warmup's fake-quant
    forward trained it, BitLinearFunction's backward returned None for it at λ=1, so from then on it silently froze.
    dL/db is Σ over every leading dim of g; dyadic g keeps the float64 sum exact in both dtypes."""
    torch.manual_seed(0)
    layer = BitLinear(32, 16, lora_rank=4, bias=True, kernel="fp32", dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.bias.normal_(0, 0.1)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 32, dtype=dtype)
    g = (torch.randint(-8, 9, (3, 5, 16)) * 0.25).to(dtype)
    grads = {}
    for lam in (1.0, 0.999):  # BitLinearFunction, and the warmup's F.linear
        layer.bias.grad, layer.quant_lambda = None, lam
        (layer(x) * g).sum().backward()
        grads[lam] = layer.bias.grad
    reference = g.double().sum((0, 1)).to(dtype)
    assert grads[1.0] is not None and grads[1.0].dtype == dtype
    assert torch.equal(grads[1.0], reference) and torch.equal(grads[0.999], reference)
    assert layer.weight.grad is None and layer.delta.grad is None  # frozen: no gradient, as before


def test_param_groups_that_would_train_a_bitlinears_frozen_weight_or_delta_are_refused():
    """W is the teacher's weight (one weight, two models) and ΔW changes only by merges: BitLinearFunction gives them
    no gradient, so a group training them trained them in the λ warmup only. Refused with any teacher kind, naming the
    parameter and the group; a bias, and a group that freezes them first, are accepted."""
    from megadistil.config import ConfigError, OptimConfig, ParamGroup, RunConfig, TeacherConfig, TeacherKind
    from megadistil.engine.model import assign_param_groups

    model = to_bitnet(tiny_llama31(), lora_rank=2, delta_format="int8")

    def cfg(*groups):
        return RunConfig(teacher=TeacherConfig(kind=TeacherKind.none),
                         optim=OptimConfig(param_groups=[ParamGroup(p, m) for p, m in groups]))

    lora = ("lora_A", 2.0)
    for groups, index, name in (([(r"q_proj\.weight$", 1.0)], 0, "model.layers.0.self_attn.q_proj.weight"),
                                ([lora, ("delta$", 0.5)], 1, "model.layers.0.self_attn.q_proj.delta"),
                                ([lora, ("delta_scale", 0.5)], 1, "model.layers.0.self_attn.q_proj.delta_scale")):
        entry = re.escape(repr(groups[-1][0]))
        with pytest.raises(ValueError, match=rf"'optim.param_groups.{index}.pattern': {entry} would train {name}, "
                                             r"a BitLinear's frozen") as raised:
            assign_param_groups(model, cfg(*groups))
        assert isinstance(raised.value, ConfigError)
    layer = model.model.layers[0].self_attn.q_proj
    layer.bias = nn.Parameter(torch.zeros(layer.out_features))  # a biased projection, as Qwen2's q/k/v
    groups = assign_param_groups(model, cfg((r"proj\.(weight|delta)", 0.0), (r"q_proj\.bias$", 1.0)))
    assert layer.bias.requires_grad and not layer.weight.requires_grad and not layer.delta.requires_grad
    assert any(p is layer.bias for g in groups for p in g["params"])


@pytest.mark.parametrize("exclude", [("mlp",), ("model.layers.0",), ("layers.1.self_attn",), ("1.mlp.down_proj",)])
def test_an_exclude_entry_naming_a_parent_module_keeps_every_linear_under_it_and_the_export_agrees(exclude, tmp_path):
    """plan_conversion accepts an entry that names any module, but is_excluded tested each linear's own name only:
    `mlp` or `model.layers.0` excluded nothing. An entry now excludes the linears it names or lies above (a name or a
    dotted suffix, as before), and the export's modules_to_not_convert lists the same ones."""
    from megadistil.export.sources import BaseModel
    from megadistil.export.ternary import StudentSpec, unconverted_modules

    base = tiny_llama31()
    base.save_pretrained(tmp_path)
    model = to_bitnet(copy.deepcopy(base), lora_rank=2, exclude=exclude)
    prefix = {"mlp": ".mlp.", "model.layers.0": "model.layers.0.", "layers.1.self_attn": "model.layers.1.self_attn.",
              "1.mlp.down_proj": "model.layers.1.mlp.down_proj"}[exclude[0]]
    under = [n for n, m in base.named_modules() if type(m) is nn.Linear and prefix in n]
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert kept == [*under, "lm_head"] and under
    spec = StudentSpec([n for n, _ in bitlinear_modules(model)], 1.0, torch.float32, False, ["lm_head", *exclude], 2)
    assert sorted(unconverted_modules(BaseModel(tmp_path), spec)) == sorted(kept)
