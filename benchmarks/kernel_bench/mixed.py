"""The tiny Llama shapes and the every-family plan shared by ``benchmarks/cuda_trace.py --mixed``
and the tests of the operators' CUDA branches (SmolLM2's structure at tiny widths)."""

from __future__ import annotations

__all__ = ["TINY", "mixed_plan"]

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "vocab_size": 256, "max_position_embeddings": 64}  # fmt: skip


def mixed_plan(model):
    """One rewritten family per linear of layer 0 (low-rank, LQ, Monarch, block-diagonal, Kronecker,
    LLM.int8(), int4), int4 g32 on the other layers: every kernel's CUDA branch in one graph."""
    from passes import Plan
    from passes.blockdiag import BlockDiagConfig
    from passes.int8_outlier import Int8OutlierConfig
    from passes.kronecker import KroneckerConfig
    from passes.lowrank import LowRankConfig
    from passes.lq import LQConfig
    from passes.monarch import MonarchConfig
    from passes.quant_storage import IntNConfig

    first = {"self_attn.q_proj": LowRankConfig(8, activation_aware=False), "self_attn.k_proj": LQConfig(8, 4, 32, activation_aware=False),
             "self_attn.v_proj": MonarchConfig(4, activation_aware=False), "self_attn.o_proj": BlockDiagConfig(2, activation_aware=False),
             "mlp.gate_proj": KroneckerConfig(8, 8, 1, activation_aware=False), "mlp.up_proj": Int8OutlierConfig(threshold=2.5),
             "mlp.down_proj": IntNConfig(4, 32)}  # fmt: skip
    plan = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and ".layers." in name:
            layer, linear = name.split(".layers.")[1].split(".", 1)
            plan[name] = first[linear.removesuffix(".weight")] if layer == "0" else IntNConfig(4, 32)
    return Plan(plan)
