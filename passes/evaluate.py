"""Quality metrics for compressed models: LM perplexity and sentence-embedding fidelity.

The protocols follow ``EVAL.md``: perplexity over non-overlapping windows of a token stream
(each window scored on its own), and, for encoders, the cosine similarity and
nearest-neighbour agreement of mean-pooled, L2-normalised sentence vectors against the
original model. Models are called positionally (``model(input_ids)``), so Hugging Face
models, plain modules and captured ``torch.fx.GraphModule``s all work; a model is put in
eval mode for the measurement and restored afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["embedding_fidelity", "perplexity", "sentence_embeddings"]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Runs the body with ``model.eval()`` (no dropout), then restores the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _first_output(output: Any, attribute: str) -> torch.Tensor:
    """Takes ``output.<attribute>`` (a ModelOutput), else ``output[0]`` (a tuple), else ``output``."""
    if isinstance(output, torch.Tensor):
        return output
    value = getattr(output, attribute, None)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find {attribute} in a model output of type {type(output).__name__}; make the "
        f"model return a tensor, a tuple whose first item is that tensor, or an object with a "
        f"`.{attribute}` attribute."
    )


@torch.no_grad()
def perplexity(
    model: nn.Module, tokens: torch.LongTensor, window: int = 512, progress: bool = True
) -> float:
    """Perplexity of a causal LM over a token stream, in non-overlapping windows.

    The stream is cut into ``len(tokens) // window`` windows (a ragged tail is dropped).
    Each window is scored on its own, without context from the previous one: the model sees
    ``window`` tokens and predicts tokens 2..``window`` from their prefixes. The result is
    ``exp(total NLL / total predicted tokens)``, with ``window - 1`` predictions per window.

    Args:
        model: A causal LM called as ``model(input_ids)`` with ``(1, window)`` ids, returning
            logits ``(1, window, vocab)``: a tensor, a tuple holding it first, or an object
            with ``.logits``.
        tokens: 1-D token ids, e.g. from :func:`passes.zoo.wiki_tokens`.
        window: Tokens per window (at least 2).
        progress: Show a tqdm bar over windows.

    Returns:
        The perplexity as a Python float.

    Raises:
        ValueError: if ``tokens`` is not 1-D, ``window < 2``, or the stream is shorter than
            one window.
    """
    if tokens.dim() != 1:
        raise ValueError(
            f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}; flatten it first."
        )
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}.")
    n_windows = tokens.numel() // window
    if n_windows == 0:
        raise ValueError(
            f"the stream has {tokens.numel()} tokens, fewer than one window of {window}; pass "
            "more tokens or a smaller window."
        )
    windows = tokens[: n_windows * window].view(n_windows, window).to(_device_of(model))

    total_nll = 0.0  # a Python float (double) so thousands of windows add up exactly enough
    with _eval_mode(model):
        for ids in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            logits = _first_output(model(ids[None]), "logits")
            nll = F.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="sum")
            total_nll += nll.item()
    return math.exp(total_nll / (n_windows * (window - 1)))


def _accepts_attention_mask(model: nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
) -> torch.Tensor:
    """Sentence vectors: the attention-mask-weighted mean of the last hidden state, L2-normalised.

    This is how all-MiniLM-L6-v2 defines its sentence embedding. The model gets the padded
    batch as ``model(input_ids, attention_mask=mask)``; a model whose ``forward`` takes no
    ``attention_mask`` (e.g. a graph captured from ``(input_ids,)`` only) gets
    ``model(input_ids)``, and padding then reaches its attention, so capture encoders with
    the mask when exact agreement matters.

    Args:
        model: An encoder returning the last hidden state ``(batch, seq, dim)``: a tensor, a
            tuple holding it first, or an object with ``.last_hidden_state``.
        tokenizer: The model's Hugging Face tokenizer.
        sentences: The texts.
        batch_size: Sentences per forward pass.
        max_length: Longer sentences are truncated to this many tokens.

    Returns:
        A float32 CPU tensor ``(len(sentences), dim)`` of unit-norm rows.

    Raises:
        ValueError: if ``sentences`` is empty or ``batch_size < 1``.
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    if not sentences:
        raise ValueError("sentences is empty; pass at least one sentence.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    device = _device_of(model)
    pass_mask = _accepts_attention_mask(model)
    vectors = []
    with _eval_mode(model):
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(
                list(sentences[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            output = model(ids, attention_mask=mask) if pass_mask else model(ids)
            hidden = _first_output(output, "last_hidden_state").float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            vectors.append(F.normalize(pooled, dim=-1).cpu())
    return torch.cat(vectors)


@torch.no_grad()
def embedding_fidelity(
    reference: nn.Module,
    candidate: nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 32,
) -> dict[str, float]:
    """How closely a candidate encoder reproduces a reference's sentence vectors.

    Args:
        reference: The original encoder.
        candidate: The compressed encoder (same tokenizer).
        tokenizer: Their tokenizer.
        sentences: Held-out texts, e.g. :func:`passes.zoo.wiki_sentences`; at least two.
        batch_size: Sentences per forward pass.

    Returns:
        ``{"cosine": ..., "nn_agreement": ...}``: the mean cosine similarity between the two
        models' vectors of each sentence, and the fraction of sentences whose nearest
        neighbour among the other sentences (by cosine) is the same under both models.

    Raises:
        ValueError: if fewer than two sentences are given.
    """
    if isinstance(sentences, str) or len(sentences) < 2:
        raise ValueError(
            "embedding_fidelity needs at least two sentences (a nearest neighbour must exist)."
        )
    ref = sentence_embeddings(reference, tokenizer, sentences, batch_size=batch_size)
    cand = sentence_embeddings(candidate, tokenizer, sentences, batch_size=batch_size)
    cosine = (ref * cand).sum(-1).mean().item()
    return {
        "cosine": cosine,
        "nn_agreement": (_nearest_neighbours(ref) == _nearest_neighbours(cand))
        .double()
        .mean()
        .item(),
    }


def _nearest_neighbours(vectors: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar other row (unit-norm rows: cosine = dot product)."""
    similarity = vectors @ vectors.T
    similarity.fill_diagonal_(float("-inf"))
    return similarity.argmax(-1)
