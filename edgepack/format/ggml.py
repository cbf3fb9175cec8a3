"""ggml's tensor types by name, and the bits of each: what a GGUF source already holds.

Standard library only: ``edgepack inspect`` (format) and the planner (plan/source.py) both
read a GGUF source's precision with it.
"""

from __future__ import annotations

import re

# bits per weight of each ggml type's codes (scales aside)
GGUF_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8, "Q8_1": 8, "Q8_K": 8, "I8": 8, "Q6_K": 6,
             "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "IQ4_NL": 4, "IQ4_XS": 4,
             "Q3_K": 3, "IQ3_XXS": 3, "IQ3_S": 3, "Q2_K": 2, "IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 2,
             "TQ2_0": 2, "IQ1_S": 1, "IQ1_M": 1, "TQ1_0": 1}


def type_in_name(name: str) -> str | None:
    """The ggml type a GGUF file's name carries ("SmolLM2-135M-Instruct.Q4_1.gguf": "Q4_1"),
    by convention; None when it names none."""
    found = [t for t in GGUF_BITS if re.search(rf"(?<![A-Za-z0-9]){t}(?![A-Za-z0-9])", name, re.IGNORECASE)]
    return max(found, key=len) if found else None
