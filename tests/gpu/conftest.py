"""GPU tests: collected only where CUDA is present (bench/gpu_check.sh runs them). On a CPU machine nothing here is
collected, so nothing is skipped and nothing counts as coverage."""

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]
