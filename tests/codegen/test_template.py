"""Generated kernel source: the epilogue is really fused (one store, its loads in the kernel), cached,
and bad specs are refused."""

from __future__ import annotations

import pytest

from codegen.kernels import dequant, lowrank, monarch
from codegen.template import ACTIVATIONS, Epilogue, EpilogueError, build, shape_class


def test_epilogue_spec_round_trip_and_errors():
    ep = Epilogue.parse(" silu, mul ,add")
    assert ep.steps == ("silu", "mul", "add") and ep.spec == "silu,mul,add" and ep.n_aux == 2
    assert Epilogue.parse("") == Epilogue()
    with pytest.raises(EpilogueError, match="valid"):
        Epilogue.parse("silu,tanh")


@pytest.mark.parametrize(
    "make",
    [lowrank.kernel, dequant.gemv_kernel, dequant.gemm_kernel, monarch.stage2_kernel, monarch.gemv_kernel],
    ids=lambda f: f.__module__ + "." + f.__name__,
)
def test_generated_source_fuses_the_epilogue(device, make):
    plain = make(Epilogue())
    fused = make(Epilogue.parse("silu,mul,add"))
    src = fused.source
    body = src[src.rindex("@triton.jit") :]  # the kernel is the template's last function
    # the chain runs on the accumulator, before the kernel's only global store
    assert ACTIVATIONS["silu"] in body
    assert "acc = acc * tl.load(aux0_ptr + out_offs" in body and "acc = acc + tl.load(aux1_ptr + out_offs" in body
    assert body.count("tl.store(") == 1
    assert body.index(ACTIVATIONS["silu"]) < body.index("tl.store(")
    assert "aux0_ptr, aux1_ptr," in body
    # the unfused kernel has none of it; both are files Triton can read source from
    assert "aux0_ptr" not in plain.source and plain.path != fused.path
    assert fused.path.read_text() == fused.source
    # cached: the same object for the same (template, epilogue)
    assert make(Epilogue.parse("silu,mul,add")) is fused


def test_template_without_slot_refuses_an_epilogue():
    with pytest.raises(EpilogueError, match="slot"):
        build("def ${KERNEL}(${AUX_PARAMS}):\n    pass\n", "_k", Epilogue.parse("relu"), ({},), (), __name__)


@pytest.mark.parametrize("cache_env, expected", [(None, True), ("0", False)])
def test_tuned_kernels_keep_their_tuning_results_on_disk(monkeypatch, cache_env, expected):
    """On a GPU, ``build`` asks Triton's autotuner to cache its results on disk (a second process does
    not tune again) where that Triton can; ``DECOMP_AUTOTUNE_CACHE=0`` turns it off."""
    import inspect

    import triton
    from triton.runtime.autotuner import Autotuner

    from codegen import template

    if "cache_results" not in inspect.signature(Autotuner.__init__).parameters:
        pytest.skip("this Triton cannot cache tuning results")
    seen = []
    monkeypatch.setattr(template, "interpreting", lambda: False)
    monkeypatch.setattr(template, "autotuning", lambda: True)
    monkeypatch.setattr(triton, "autotune", lambda **kw: seen.append(kw) or (lambda fn: fn))
    if cache_env is None:
        monkeypatch.delenv("DECOMP_AUTOTUNE_CACHE", raising=False)
    else:
        monkeypatch.setenv("DECOMP_AUTOTUNE_CACHE", cache_env)
    source = f"@triton.jit\ndef ${{KERNEL}}(x_ptr, M, BM: tl.constexpr):\n    pass  # {cache_env}\n"
    build(source, "_cache_probe", Epilogue(), ({"BM": 16}, {"BM": 32}), ("M",), __name__)
    assert len(seen) == 1 and seen[0].get("cache_results", False) is expected
    assert [c.kwargs for c in seen[0]["configs"]] == [{"BM": 16}, {"BM": 32}]


def test_shape_classes():
    assert [shape_class(m) for m in (1, 2, 3, 16, 17, 500, 512, 513, 10**6)] == [1, 2, 4, 16, 32, 512, 512, 1024, 4096]
