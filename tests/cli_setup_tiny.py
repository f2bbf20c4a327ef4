"""A user setup for ``lowrank-ggn --setup cli_setup_tiny:make`` (used by test_cli.py)."""

import torch
from torch import nn


def make():
    """A small BatchNorm MLP in train mode, float32, with a CE batch of 6."""
    gen = torch.Generator().manual_seed(7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = nn.Sequential(
            nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)
        )
    X = torch.randn(6, 5, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    return model, nn.CrossEntropyLoss(), (X, y)


def not_a_problem():
    """Returns the wrong thing."""
    return 42
