"""Shared fixtures: small models of every architecture the spine must capture."""

from __future__ import annotations

import os

import pytest
import torch
from toy_models import CNN, MLP

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def mlp_batches():
    g = torch.Generator().manual_seed(1)
    # anisotropic inputs, so that activation-aware and plain factorisations differ
    scale = torch.logspace(0, -2, 48)
    return [(torch.randn(64, 48, generator=g) * scale,) for _ in range(4)]


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return CNN().eval()
