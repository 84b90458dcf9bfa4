"""tools/precompute_teacher.py with the process group's timeout cut to MEGADISTIL_TEST_DIST_TIMEOUT_S and rank 1
MEGADISTIL_TEST_RANK1_DELAY_S late with its first batch (the tests' harness, not production code): the ranks finish
further apart than the timeout, as after a resume that kept different numbers of shards on each."""

import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistil.data import precompute

precompute.init_distributed = functools.partial(precompute.init_distributed,
                                                timeout_s=float(os.environ["MEGADISTIL_TEST_DIST_TIMEOUT_S"]))
_topk, _late = precompute.teacher_topk, [os.environ.get("RANK") == "1"]


def _late_topk(*args, **kwargs):
    if _late.pop() if _late else False:
        time.sleep(float(os.environ["MEGADISTIL_TEST_RANK1_DELAY_S"]))
    return _topk(*args, **kwargs)


precompute.teacher_topk = _late_topk
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from precompute_teacher import main

from megadistil.utils import exit_without_teardown

if __name__ == "__main__":
    exit_without_teardown(main())
