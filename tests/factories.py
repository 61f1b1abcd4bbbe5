"""Model factories for the ``decomp optimize module:factory`` CLI tests."""

import torch
from toy_models import MLP


def mlp_with_data():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 48, generator=g),) for _ in range(3)]
    return MLP().eval(), batches[0], batches


def mlp_only():
    return MLP().eval()
