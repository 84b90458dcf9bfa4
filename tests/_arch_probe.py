"""Run under `deepspeed --num_gpus 2`: train every model dir given, in turn, inside these same two processes with
megadistil's Trainer, then measure vanilla transformers' perplexity of the original model on the trainer's held-out
sequences. Rank 0 appends one JSON line per model to argv[1].

    _arch_probe.py OUT.jsonl RUNS_ROOT HELDOUT_TEXT TRAIN_TEXT MODEL_DIR... [key=value overrides after --]
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from megadistil.config import load_config
from megadistil.distributed import init_distributed
from megadistil.engine.trainer import Trainer


@torch.no_grad()
def vanilla_perplexity(model_dir: str, seqs) -> float:
    """exp(mean next-token CE) of the model as transformers alone loads and runs it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(seqs).long()
    logits = model(input_ids=ids).logits[:, :-1].double()
    return math.exp(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    split = args.index("--") if "--" in args else len(args)
    (out, runs_root, heldout, text, *model_dirs), overrides = args[:split], args[split + 1:]
    init_distributed()  # one process group for every run: a Trainer ends only a group it started
    for model_dir in model_dirs:
        start = time.perf_counter()
        run_dir = Path(runs_root) / Path(model_dir).name
        cfg = load_config("configs/tiny.yaml", [f"model.student={model_dir}", f"train.output_dir={run_dir}",
                                                f"data.text=[{text}]", f"data.eval_text=[{heldout}]", *overrides])
        trainer = Trainer(cfg, "ds_configs/zero3.json")
        try:
            trainer.setup()
            trainer.train()
        finally:
            trainer.cleanup()
        if trainer.dist.rank == 0:
            record = {"model_dir": model_dir, "run_dir": str(run_dir), "steps": trainer.state.step,
                      "eval_sequences": len(trainer.eval_seqs),
                      "vanilla_ppl": vanilla_perplexity(model_dir, trainer.eval_seqs),
                      "seconds": time.perf_counter() - start}
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
