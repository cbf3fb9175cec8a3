"""8-bit (or any native-backend) bundle's perplexity against the float32 source on more held-out
text than cpu_bench scores, to narrow the standard error of the delta.

    .venv/bin/python tests/bench/quality_wide.py BUNDLE [--windows 8] [--tokens 4000]

Windows of --tokens tokens of Python's pydoc topics, taken after the part cpu_bench's quality
text uses, each scored on its own: the source (the default model's GGUF, dequantized to
float32 by transformers) in one forward, the bundle one token a step through edgepack's CPU
engine, as it decodes. Prints the running perplexity delta and its standard error (per-token
log-likelihood differences). About 3 minutes a 4000-token window on 2 cores (the float32
reference's attention dominates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import gguf_variants  # noqa: E402
import peer_llamacpp as peer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4000, help="tokens per window (SmolLM2's context: 8192)")
    args = parser.parse_args()
    import pydoc_data.topics as topics
    import torch
    from transformers import AutoModelForCausalLM

    import edgepack

    lm = edgepack.load(args.bundle, verify=False, backend="native")
    pydoc = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = lm.tokenizer.encode(pydoc[peer.QUALITY_PYDOC_CHARS :], add_special_tokens=False)
    src = gguf_variants.default_src_gguf()
    ref_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    diffs = []
    for w in range(args.windows):
        toks = ids[w * args.tokens : (w + 1) * args.tokens]
        if len(toks) < args.tokens:
            break
        with torch.no_grad():
            ref = torch.log_softmax(ref_model(torch.tensor([toks])).logits[0].double(), -1).numpy()
        cache = lm.model.new_cache(len(toks))
        ours = np.stack([np.frombuffer(lm.model.forward([t], cache), dtype=np.float32) for t in toks]).astype(np.float64)
        top = ours.max(-1, keepdims=True)
        ours = ours - top - np.log(np.exp(ours - top).sum(-1, keepdims=True))
        rows, targets = np.arange(len(toks) - 1), np.array(toks[1:])
        diffs.append(ref[rows, targets] - ours[rows, targets])  # NLL(bundle) - NLL(source), per token
        d = np.concatenate(diffs)
        print(f"window {w}: mean dNLL {diffs[-1].mean():+.5f}; {len(d)} tokens: perplexity vs source "
              f"{100 * (np.exp(d.mean()) - 1):+.3f}% (standard error {100 * d.std(ddof=1) / np.sqrt(len(d)):.3f}%)",
              flush=True)


if __name__ == "__main__":
    main()
