"""Compress the packaged SmolLM2-135M to 92% of its memory and compare perplexity.

    python examples/smollm2_lowrank.py      # ~2 minutes on 2 CPU cores
"""

import passes
from passes import evaluate, zoo

model, tokenizer = zoo.load_smollm2()
batches = zoo.calibration_batches(tokenizer, n_seqs=32, seq_len=256)
optimized = passes.optimize(
    model, (batches[0][0][:1, :32],), target_memory=0.92, calibration=batches, transforms=("lowrank",)
)
print(optimized.report)

tokens = zoo.wiki_tokens(tokenizer, "evaluation", 2048)
print(f"perplexity on 2,048 Wikipedia tokens: {evaluate.perplexity(model, tokens):.2f} -> "
      f"{evaluate.perplexity(optimized, tokens):.2f}")
