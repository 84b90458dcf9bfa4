"""vLLM as generate_teacher_data's engine (`--backend vllm`, GPU): the same prompts, lines and files as the torch
backend, sampled by vLLM's continuous-batching engine instead of megadistil.sampling.

Mapping: one temperature for every position (vLLM has no per-position schedule: a schedule is refused), top_k 0 ->
vLLM's -1 (off), each prompt seeded by its global index as megadistil.sampling seeds it (so a resumed run samples the
same continuation; vLLM's tokens still differ from the torch backend's, whose generator differs), EOS ids as stop
tokens kept in the continuation (the torch backend keeps the stopping token too), --no-stop-at-eos as ignore_eos.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from megadistil.sampling import SamplingConfig

Rows = list[tuple[int, list[int]]]  # (global prompt index, prompt ids)


def check_vllm(sampling: SamplingConfig, zero3: bool, world: int) -> None:
    """Refuse what the vLLM backend cannot do, naming the argument, before anything loads."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--backend vllm: vllm is not installed (pip install vllm, on a CUDA machine)")
    if len(set(sampling.temperatures)) > 1:
        raise ValueError(f"--temperatures {' '.join(map(str, sampling.temperatures))}: vLLM samples every position "
                         "at one temperature; give one value, or use --backend torch for a schedule")
    if zero3:
        raise ValueError("--zero3 partitions a torch model: with --backend vllm, vLLM places the model itself")
    if world > 1:
        raise ValueError(f"--backend vllm runs in one process (vLLM spreads a model over GPUs itself); got "
                         f"{world} ranks: launch with python, not deepspeed")


class VLLMSampler:
    """Rows -> each prompt's continuation ids (the stopping EOS kept), on a vLLM engine."""

    def __init__(self, teacher: str, dtype: str, sampling: SamplingConfig, eos: int | Sequence[int] | None) -> None:
        import vllm

        self.vllm, self.sampling = vllm, sampling
        self.llm = vllm.LLM(model=teacher, dtype=dtype, seed=sampling.seed, trust_remote_code=False)
        self.stops = [eos] if isinstance(eos, int) else list(eos or ())

    def params(self, index: int) -> Any:
        s = self.sampling
        return self.vllm.SamplingParams(
            n=1, temperature=s.temperatures[0], top_p=s.top_p, top_k=s.top_k or -1, max_tokens=s.max_new_tokens,
            seed=s.seed * 1_000_003 + index, stop_token_ids=self.stops if s.stop_at_eos else None,
            ignore_eos=not s.stop_at_eos, detokenize=False)

    def __call__(self, rows: Rows) -> list[list[int]]:
        outputs = self.llm.generate([{"prompt_token_ids": ids} for _, ids in rows],
                                    [self.params(i) for i, _ in rows], use_tqdm=False)
        return [self._ids(out.outputs[0]) for out in outputs]

    def _ids(self, completion: Any) -> list[int]:
        """The completion's ids with the stopping token last, whether or not this vLLM version returns it."""
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and self.stops and (not ids or ids[-1] not in self.stops):
            ids.append(completion.stop_reason if isinstance(completion.stop_reason, int) else self.stops[0])
        return ids

    def close(self) -> None:
        """Free the engine's GPU memory (before the HF teacher loads for --shards)."""
        import gc

        import torch

        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
