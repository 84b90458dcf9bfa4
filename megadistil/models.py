"""The one place that reaches into a transformers causal LM: its decoder, decoder layers, output head, the transform
its forward applies to the head's output, its attention implementation and its q/k/v projections.

Everything goes through transformers' own accessors (`get_decoder()`, `get_output_embeddings()`) or is found by
shape and layout, never by one architecture's attribute names, so every decoder-only family transformers ships is
handled the same way; what cannot be handled raises an error naming the class. Plain torch + transformers: no
DeepSpeed, nothing else from megadistil except the loss's LogitTransform.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import keyword
import re
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig

from megadistil.distill.losses import LogitTransform

__all__ = [
    "LogitTransform", "ahead_of_each_layer", "attn_implementation", "capture_qkv", "causal_lm_class", "decoder",
    "decoder_layers", "final_norm", "logit_transform", "output_head", "output_head_name",
]

# ---------------------------------------------------------------- parts


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) whose last_hidden_state feeds the output head."""
    found = model.get_decoder() if hasattr(model, "get_decoder") else None
    if found is None or found is model:
        raise ValueError(f"{type(model).__name__} has no decoder module (transformers' get_decoder() finds none): "
                         "megadistil needs a decoder-only causal LM whose head sits on a decoder stack")
    return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of blocks: the one ModuleList child with config.num_hidden_layers entries."""
    count = model.config.get_text_config().num_hidden_layers
    stack = decoder(model)
    found = [m for m in stack.children() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise ValueError(f"{type(stack).__name__} has {len(found)} ModuleLists of num_hidden_layers={count} blocks "
                         "among its children; megadistil needs exactly one to find the decoder layers")
    return found[0]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the decoder applies after its last layer: its one child with parameters besides the input embedding
    and the decoder layers (norm, final_layer_norm, ...; the rotary embedding and dropout hold none)."""
    stack, skip = decoder(model), (model.get_input_embeddings(), decoder_layers(model))
    found = [m for m in stack.children() if all(m is not s for s in skip) and next(m.parameters(), None) is not None]
    if len(found) != 1:
        raise ValueError(f"{type(stack).__name__} has {len(found)} children with parameters besides its embedding and "
                         "layers; megadistil needs exactly one, the final norm")
    return found[0]


@contextlib.contextmanager
def ahead_of_each_layer(model: nn.Module, run: Callable[[int, Callable, tuple, dict], None]) -> Iterator[None]:
    """Within the block, each decoder layer's forward first calls run(index, forward, args, kwargs) with the layer's
    own forward and arguments, then runs as usual. It runs inside the layer's module call, so within the hooks around
    it (ZeRO-3's gather of the layer) and before activation checkpointing's wrapper; a recompute replays the plain
    forward."""
    layers = decoder_layers(model)
    before = [vars(layer).get("forward") for layer in layers]  # an instance's own forward, if it has one

    def paired(index: int, forward: Callable) -> Callable:
        def forward_after_run(*args, **kwargs):
            run(index, forward, args, kwargs)
            return forward(*args, **kwargs)
        return forward_after_run

    try:
        for i, layer in enumerate(layers):
            layer.forward = paired(i, layer.forward)
        yield
    finally:
        for layer, own in zip(layers, before):
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def output_head(model: nn.Module) -> nn.Module:
    """The LM head (get_output_embeddings()); its weight is [vocab, hidden]."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    if getattr(head, "bias", None) is not None:
        # The chunked LM-head loss computes hidden @ weight.T; a bias would be silently dropped.
        raise ValueError(f"{type(model).__name__}'s output head has a bias, which megadistil's chunked LM-head "
                         "loss does not apply")
    return head


def output_head_name(model: nn.Module) -> str:
    """The output head's module name (what transformers' quantizers match against: lm_head, output_projection...)."""
    head = output_head(model)
    return next(name for name, module in model.named_modules() if module is head)


def causal_lm_class(config: PretrainedConfig, trust_remote_code: bool = False) -> type[nn.Module]:
    """The class AutoModelForCausalLM builds for this config, without building it."""
    from transformers import AutoModelForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    remote = (getattr(config, "auto_map", None) or {}).get(AutoModelForCausalLM.__name__)
    if remote and trust_remote_code:
        return get_class_from_dynamic_module(remote, config._name_or_path)
    raise ValueError(f"model_type={config.model_type!r} ({type(config).__name__}) is not a causal LM that "
                     "transformers' AutoModelForCausalLM builds" + (" (remote code is off)" if remote else ""))


# ---------------------------------------------------------------- the output head's transform

# Config attributes that causal LMs' forwards apply to the head's output, and how (transformers 5.x sources):
# `final_logit_softcapping` cap * tanh(z / cap) (Gemma 2/3/3n/4, Nanochat, Mistral-Large-4; None = off),
# `logit_scale` multiplies (Cohere, Cohere2), `output_multiplier` (Muse) and `lm_head_multiplier` (Falcon-H1) multiply,
# `logits_scaling` divides (Granite; HyperCLOVAX multiplies by its `logits_scaling`, which the scan below refuses).
SOFTCAP_KEY = "final_logit_softcapping"
SCALE_KEYS = {"logit_scale": "*", "output_multiplier": "*", "lm_head_multiplier": "*", "logits_scaling": "/"}
# Names that may appear between the head's call and the loss without changing the logits.
_NEUTRAL_NAMES = {"self", "config", "text_config", "get_text_config", "model", "hidden_states", "slice_indices",
                  "torch", "tanh", "float", "to", "contiguous", "dtype", "weight"}
_HEAD_CALL = re.compile(r"\b(\w*logits)\s*=\s*self\.(\w+)\(")  # logits = self.lm_head(...)


def logit_transform(config: PretrainedConfig, model_class: type[nn.Module] | None = None) -> LogitTransform:
    """What the model's own forward applies to its output head's result, read from that forward's source (which
    config attributes it uses, and with which operator) and valued from the config. An operation the scan does not
    recognise raises, naming the class and the code, instead of training on logits that are not the model's."""
    cls = model_class or causal_lm_class(config)
    variables, window = _head_to_loss_source(cls)
    names = set(re.findall(r"[A-Za-z_]\w*", window)) - set(keyword.kwlist)
    unknown = sorted(names - _NEUTRAL_NAMES - variables - {SOFTCAP_KEY, *SCALE_KEYS})
    if unknown:
        raise ValueError(_unknown_transform(cls, window, f"names {unknown}"))
    scale, softcap = 1.0, None
    for key in sorted(names & set(SCALE_KEYS)):
        op = SCALE_KEYS[key]
        if not re.search(rf"{re.escape(op)}\s*[\w.()]*\b{key}\b", window):
            raise ValueError(_unknown_transform(cls, window, f"{key} not applied with {op!r}"))
        value = _config_value(config, key)
        if value is not None:
            scale = scale * value if op == "*" else scale / value
    if SOFTCAP_KEY in names:
        if "tanh" not in names:
            raise ValueError(_unknown_transform(cls, window, f"{SOFTCAP_KEY} without tanh"))
        if any(window.find(key) > window.find(SOFTCAP_KEY) for key in names & set(SCALE_KEYS)):
            # LogitTransform scales first, then caps (as Muse's forward does)
            raise ValueError(_unknown_transform(cls, window, "a scale after the softcap"))
        softcap = _config_value(config, SOFTCAP_KEY)
    return LogitTransform(scale=float(scale), softcap=float(softcap) if softcap else None)


def _config_value(config: PretrainedConfig, key: str) -> float | None:
    for source in (config, config.get_text_config()):
        if hasattr(source, key):
            return getattr(source, key)
    raise ValueError(f"{type(config).__name__} has no {key!r}, which its model's forward applies to the logits")


@functools.cache
def _head_to_loss_source(cls: type[nn.Module]) -> tuple[set[str], str]:
    """The names of the logits variable and the head, and the forward's code from the head's call to the first
    mention of the loss, comments dropped."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        raise ValueError(f"cannot read the source of {cls.__name__}.forward to tell what it applies to its output "
                         "head's logits") from None
    source = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    call = _HEAD_CALL.search(source)
    end = source.find("loss", call.end()) if call else -1
    if call is None or end < 0:
        raise ValueError(f"cannot find `logits = self.<head>(...)` followed by the loss in {cls.__name__}.forward, "
                         "so not what it applies to the head's output")
    return {call[1], call[2]}, source[call.start():end]


def _unknown_transform(cls: type[nn.Module], window: str, what: str) -> str:
    code = "; ".join(line.strip() for line in window.splitlines() if line.strip())
    return (f"{cls.__name__}.forward transforms its output head's logits in a way megadistil does not model "
            f"({what}): {code}")


# ---------------------------------------------------------------- attention implementation

def attn_implementation(model_config: PretrainedConfig, requested: str, device: torch.device | str,
                        trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> str:
    """`auto`: flash_attention_2 on an Ampere+ CUDA device, in bf16/fp16 (`dtype`, where known), when flash_attn is
    importable and the class supports it; else sdpa where it can run (not with Gemma 2's attention-score softcap),
    else eager. An explicit choice the model or the device cannot do is a ValueError naming
    model.attn_implementation."""
    requested = str(requested)  # the config's enum member or a plain string alike
    cls = causal_lm_class(model_config, trust_remote_code)
    flash = _flash_unavailable(cls, torch.device(device), dtype)
    sdpa = sdpa_unavailable(model_config, cls)
    if requested == "auto":
        return "flash_attention_2" if flash is None else "sdpa" if sdpa is None else "eager"
    unknown = "not one of auto, sdpa, eager, flash_attention_2"
    reason = {"eager": None, "sdpa": sdpa, "flash_attention_2": flash}.get(requested, unknown)
    if reason is not None:
        raise ValueError(f"model.attn_implementation={requested!r} cannot run here: {reason} (auto picks what "
                         "the model supports)")
    return requested


def sdpa_unavailable(model_config: PretrainedConfig, cls: type[nn.Module]) -> str | None:
    """Why sdpa cannot run this model, or None. A score softcap rules it out whatever the class claims:
    transformers < 5.25 says Gemma 2 supports sdpa, and its sdpa path drops attn_logit_softcapping."""
    if not getattr(cls, "_supports_sdpa", False):
        return f"{cls.__name__} does not support sdpa"
    if getattr(model_config, "attn_logit_softcapping", None) is not None:
        return f"{cls.__name__} does not support sdpa with attn_logit_softcapping (sdpa drops the softcap)"
    return None


def _flash_unavailable(cls: type[nn.Module], device: torch.device, dtype: torch.dtype | None) -> str | None:
    if device.type != "cuda":
        return f"flash_attention_2 needs a CUDA device, this is {device.type}"
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        return f"flash_attention_2 runs in bf16 or fp16, the model is in {dtype} (model.dtype)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"flash_attention_2 needs an Ampere or newer GPU, {torch.cuda.get_device_name(device)} is not"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed"
    if not (getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False)):
        return f"{cls.__name__} does not support flash attention"
    return None


# ---------------------------------------------------------------- q/k/v projections

QKV = tuple[Tensor, Tensor, Tensor]


@contextlib.contextmanager
def capture_qkv(model: nn.Module, layers: list[int]) -> Iterator[dict[int, QKV]]:
    """Within the block, each forward fills {layer: (q, k, v)} with the outputs of the given decoder layers' q/k/v
    projections ([B, S, heads * head_dim] each, before any q/k norm or rotary embedding), split out of a fused
    projection where the architecture has one. A recomputed forward (activation checkpointing) overwrites them."""
    captured: dict[int, QKV] = {}
    handles = []
    blocks = decoder_layers(model) if layers else []
    try:
        for i in layers:
            modules, split = _qkv_layout(model.config.get_text_config(), _attention(blocks[i], i))
            hooks = _collector(captured, i, split, len(modules))
            handles += [m.register_forward_hook(hook) for m, hook in zip(modules, hooks)]
        yield captured
    finally:
        for h in handles:
            h.remove()


def _collector(captured: dict[int, QKV], index: int, split: Callable[[list[Tensor]], QKV],
               count: int) -> list[Callable]:
    """One forward hook per projection module; the last of a forward's outputs completes captured[index]."""
    pending: dict[int, Tensor] = {}

    def hook_for(j: int) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            pending[j] = output
            if len(pending) == count:
                captured[index] = split([pending.pop(k) for k in range(count)])
        return hook

    return [hook_for(j) for j in range(count)]


QKV_LAYOUTS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",), ("query_key_value",))


def _attention(block: nn.Module, index: int) -> nn.Module:
    """The block's one submodule that owns q/k/v projections in a layout we know."""
    found = [m for _, m in block.named_modules()
             if any(all(isinstance(getattr(m, n, None), nn.Module) for n in layout) for layout in QKV_LAYOUTS)]
    if len(found) != 1:
        names = " | ".join("/".join(layout) for layout in QKV_LAYOUTS)
        raise ValueError(f"decoder layer {index} ({type(block).__name__}) has {len(found)} attention modules with "
                         f"q/k/v projections ({names}); the attention-relation loss needs exactly one")
    return found[0]


def _qkv_layout(config: PretrainedConfig,
                attention: nn.Module) -> tuple[list[nn.Module], Callable[[list[Tensor]], QKV]]:
    """The projection modules to hook and how their outputs become (q, k, v)."""
    if hasattr(attention, "q_proj"):  # Llama, Qwen, Mistral, Gemma, OLMo: separate projections
        return [attention.q_proj, attention.k_proj, attention.v_proj], tuple
    heads = config.num_attention_heads
    head_dim = getattr(attention, "head_dim", None) or getattr(attention, "head_size", None) or \
        config.hidden_size // heads
    if hasattr(attention, "qkv_proj"):  # Phi-3: [q | k | v] along the output features
        kv = getattr(config, "num_key_value_heads", None) or heads
        sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
        return [attention.qkv_proj], lambda outputs: tuple(outputs[0].split(sizes, dim=-1))
    # GPT-NeoX: the output is per head [q | k | v], i.e. [heads, 3, head_dim] (its forward views then chunks)
    return [attention.query_key_value], lambda outputs: tuple(
        outputs[0].unflatten(-1, (heads, 3, head_dim))[..., j, :].flatten(-2) for j in range(3))
