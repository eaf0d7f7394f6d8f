"""The demo sizes its pretraining to the machine: the rule, and the step timer it reads."""

import torch

from encoder_guard.config import load_config
from encoder_guard.demo import DEMO_EPOCHS, MIN_EPOCHS, demo_epochs
from pretrain.timing import step_seconds


def test_demo_epochs_fill_the_budget_within_their_bounds():
    assert demo_epochs(0.20, 234, budget_s=300) == DEMO_EPOCHS  # 47 s an epoch: 6 fit, 6 is the cap
    assert demo_epochs(0.226, 234) == DEMO_EPOCHS and demo_epochs(0.59, 234) == 2  # two CPUs: with native bf16 and without
    assert demo_epochs(0.30, 234, budget_s=300) == 4  # 70 s an epoch
    assert demo_epochs(0.56, 234, budget_s=300) == 2  # 131 s an epoch
    assert demo_epochs(5.0, 234, budget_s=300) == MIN_EPOCHS  # nothing fits: the floor, not zero
    assert demo_epochs(0.01, 234, budget_s=300) == DEMO_EPOCHS


def test_step_seconds_times_the_presets_step_and_leaves_the_random_state_alone():
    cfg = load_config("fmnist-tiny", "pretrain")
    before = torch.get_rng_state()
    seconds = step_seconds(cfg, batch=8, steps=1, size=28, chans=1, warmup=1)
    assert 0 < seconds < 30
    assert torch.equal(torch.get_rng_state(), before)
