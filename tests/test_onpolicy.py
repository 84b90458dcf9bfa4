"""On-policy pieces without DeepSpeed: the micro-batch schedule, the seeds' indices, the batch built from a
generation (labels on generated tokens only). The trainer's on-policy run is in test_train."""

import math

import torch

from megadistil.distill.losses import IGNORE_INDEX
from megadistil.distill.onpolicy import is_onpolicy, onpolicy_batch, sequence_indices
from megadistil.sampling import Generation

I = IGNORE_INDEX


def test_the_schedule_spreads_the_fraction_evenly():
    assert [k for k in range(8) if is_onpolicy(k, 0.25)] == [3, 7]
    assert [k for k in range(6) if is_onpolicy(k, 0.5)] == [1, 3, 5]
    assert all(is_onpolicy(k, 1.0) for k in range(50)) and not any(is_onpolicy(k, 0.0) for k in range(50))
    for fraction in (0.1, 0.3, 2 / 3):
        assert sum(is_onpolicy(k, fraction) for k in range(300)) == math.floor(300 * fraction + 1e-9)


def test_every_sequence_of_the_run_has_its_own_seed_index():
    seen = [i for micro in range(5) for rank in range(3) for i in sequence_indices(micro, rank, 3, 4)]
    assert sorted(seen) == list(range(5 * 3 * 4))


def test_labels_cover_the_generated_tokens_up_to_each_stop():
    prompts = torch.tensor([[10, 11, 12], [20, 21, 22]])
    gen = Generation(tokens=torch.tensor([[30, 31, 0, 0, 0], [40, 41, 42, 43, 0]]), lengths=torch.tensor([2, 4]))
    batch = onpolicy_batch(prompts, gen)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 30, 31, 0, 0], [20, 21, 22, 40, 41, 42, 43]]
    # position t predicts input_ids[t + 1]: the prompt's last position predicts the first generated token
    assert batch["labels"].tolist() == [[I, I, 30, 31, I, I, I], [I, I, 40, 41, 42, 43, I]]
