"""Capture and weight-site discovery on every architecture the spine supports."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toy_models import tiny_bert, tiny_gpt2, tiny_llama

from ir import CaptureError, UseKind, capture, find_weight_sites, to_networkx


def _sites(model, inputs):
    program = capture(model, inputs)
    sites, skipped = find_weight_sites(program, model)
    return program, sites, skipped


def test_llama_tied_embedding_is_one_site():
    model = tiny_llama(tied=True, layers=2)
    program, sites, skipped = _sites(model, (torch.randint(0, 256, (1, 8)),))
    assert len(sites) == 1 + 2 * 7 and not skipped
    table = sites[0]
    assert table.aliases == ("model.embed_tokens.weight", "lm_head.weight")
    assert [u.kind for u in table.uses] == [UseKind.EMBEDDING, UseKind.LINEAR]
    assert [u.module for u in table.uses] == ["model.embed_tokens", "lm_head"]
    q, k, v = sites[1:4]
    assert q.uses[0].input_node == k.uses[0].input_node == v.uses[0].input_node
    assert k.matrix_shape == (32, 64) and k.uses[0].rows == 8
    tagged = [n for n in program.graph.nodes if "decomp_param" in n.meta]
    assert len(tagged) == 16  # 14 linears + embedding + lm_head
    assert all(tuple(n.meta["val"].shape)[-1] > 0 for n in tagged)


def test_llama_untied_has_two_sites():
    model = tiny_llama(tied=False, layers=1)
    _, sites, _ = _sites(model, (torch.randint(0, 256, (1, 8)),))
    names = [s.name for s in sites]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names and len(sites) == 9


def test_gpt2_conv1d_orientation():
    model = tiny_gpt2()
    _, sites, skipped = _sites(model, (torch.randint(0, 256, (1, 8)),))
    conv = [s for s in sites if s.uses[0].kind is UseKind.CONV1D]
    assert len(conv) == 2 * 4 and not skipped
    c_attn = next(s for s in conv if s.name.endswith("attn.c_attn.weight"))
    assert c_attn.shape == (64, 192) and c_attn.matrix_shape == (192, 64)
    assert {u.kind for s in sites for u in s.uses} == {UseKind.CONV1D, UseKind.EMBEDDING, UseKind.LINEAR}


def test_bert_keyword_inputs():
    model = tiny_bert()
    inputs = {"input_ids": torch.randint(0, 256, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    _, sites, _ = _sites(model, inputs)
    linears = [s for s in sites if s.uses[0].kind is UseKind.LINEAR]
    assert len(linears) == 2 * 6 + 1  # q, k, v, o, intermediate, output per layer; pooler
    assert sum(s.uses[0].kind is UseKind.EMBEDDING for s in sites) == 3


def test_mlp_and_cnn(mlp, cnn):
    _, sites, skipped = _sites(mlp, (torch.randn(3, 48),))
    assert [s.name for s in sites] == ["fc1.weight", "fc2.weight", "fc3.weight"] and not skipped
    _, sites, skipped = _sites(cnn, (torch.randn(2, 3, 8, 8),))
    assert [(s.name, s.uses[0].kind) for s in sites] == [("conv1.weight", UseKind.CONV1X1), ("head.weight", UseKind.LINEAR)]
    assert sites[0].uses[0].rows == 2 * 8 * 8
    assert [p.name for p in skipped] == ["conv3.weight"] and "conv2d" in skipped[0].reason


def test_networkx_view_matches_graph(mlp):
    program = capture(mlp, (torch.randn(3, 48),))
    g = to_networkx(program.graph)
    assert g.number_of_nodes() == len(program.graph.nodes)
    assert g.has_edge("x", "linear") and g.nodes["linear"]["shape"] == (3, 96)


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not capturable
            return x * 2
        return x


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gate = _Branchy()

    def forward(self, x):
        return self.gate(self.proj(x))


def test_capture_error_names_module():
    with pytest.raises(CaptureError) as info:
        capture(_Outer(), (torch.randn(2, 4),))
    assert info.value.module == "gate"
    assert "gate" in str(info.value) and "_Branchy" in str(info.value) and "test_capture.py" in info.value.location


def test_capture_does_not_modify_model(mlp):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    capture(mlp, (torch.randn(3, 48),))
    for k, v in mlp.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
