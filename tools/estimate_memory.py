#!/usr/bin/env python
"""Will a run fit? Per-GPU memory of a megadistil run under ZeRO-3, term by term, and a verdict.

  python tools/estimate_memory.py --config configs/llama3.1-8b.yaml --nodes 1 --gpus-per-node 8
  python tools/estimate_memory.py --config configs/llama3.1-70b.yaml --nodes 1 --gpus-per-node 8 --offload
  python tools/estimate_memory.py --config configs/llama3.1-70b.yaml --nodes 8 --gpus-per-node 8 data.seq_len=4096
  python tools/estimate_memory.py --config configs/qwen2.5-0.5b.yaml --nodes 1 --gpus-per-node 1 --gpu-memory 24GB

Model dimensions come from model.student's config.json when it exists, else --model-config (a config.json, a model
dir, or a preset: llama3.1-8b, llama3.1-70b, qwen2.5-0.5b, phi-3-mini), else the preset that the student path or
config file name spells. The block is counted per architecture (Qwen2's q/k/v biases, Phi-3's fused qkv_proj and
gate_up_proj, a tied LM head); an unknown model_type is counted as a Llama block, and the title says so.
Exit status: 0 fits, 1 does not fit, 2 bad input (or a model it cannot size here: no verdict).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistil.config import ConfigError, load_config
from megadistil.engine.ds_config import load_ds_config, reconcile_ds_config
from megadistil.engine.memory import Layout, as_trained, dtype_bytes, estimate, parse_bytes, resolve_dims, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config yaml")
    parser.add_argument("--ds_config", "--ds-config", default="ds_configs/zero3.json", help="DeepSpeed config json")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--offload", action="store_true", help="optimizer and parameters on the CPU "
                        "(as ds_configs/zero3_offload.json)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB)")
    parser.add_argument("--model-config", default=None, help="config.json, model dir or preset name")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the run config")
    args = parser.parse_args(argv)
    try:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ConfigError(f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node}: both must be >= 1")
        cfg = as_trained(load_config(args.config, args.overrides))
        dims, source = resolve_dims(cfg, model_config=args.model_config, config_path=args.config)
        layout = Layout(args.nodes, args.gpus_per_node)
        # the trainer's own ds_config checks, as on these ranks (model.dtype auto: bf16 on the GPUs planned for)
        ds_config = reconcile_ds_config(cfg, load_ds_config(args.ds_config), world_size=layout.world,
                                        bf16=dtype_bytes(cfg) == 2)
        est = estimate(cfg, dims, layout, ds_config, offload=args.offload, capacity=parse_bytes(args.gpu_memory))
    except ConfigError as e:
        print(f"estimate_memory: error: {e}", file=sys.stderr)
        return 2
    title = (f"{args.config} on {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {layout.world} ranks, "
             f"{args.ds_config}{' + --offload' if args.offload else ''}; model: {source}; micro batch "
             f"{cfg.train.micro_batch_size} x seq {cfg.data.seq_len}")
    print(table(est, title))
    if est.uncounted:
        print(f"estimate_memory: error: no verdict: {'; '.join(est.uncounted)}", file=sys.stderr)
        return 2
    return 0 if est.fits else 1


if __name__ == "__main__":
    sys.exit(main())
