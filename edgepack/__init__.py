"""edgepack: quantize a Hugging Face causal LM once, run it on a small box.

``edgepack.load(bundle_dir)`` is the runtime entry point; it is imported lazily so that
``import edgepack`` stays cheap and never pulls in the exporter, planner or Hub code.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def load(bundle_dir, **kwargs):
    """Load a bundle; see edgepack.runtime.load."""
    from edgepack.runtime import load as _load

    return _load(bundle_dir, **kwargs)
