"""The main door: deepspeed launch/train.py --ds_config ds_configs/zero3.json --config configs/tiny.yaml [k=v ...]

Also runs under torchrun, srun (launch/slurm/train.sbatch) and mpirun: ranks come from the launcher's environment.
"""

import argparse
import sys

from megadistil import stop_signal

stop_signal.watch()  # first: a time-limit warning during the imports below would otherwise end the process

from megadistil.config import ConfigError, load_config
from megadistil.engine.trainer import run
from megadistil.utils import exit_without_teardown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config yaml (configs/*.yaml)")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json", help="DeepSpeed config json")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, args.ds_config)
    except ConfigError as e:
        print(f"megadistil: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
