"""Packing a model into a bundle (pack.py): sources (Hub, folder, GGUF, streamed shards),
quantization, smoothing, GPTQ, reference logits, writing and self-checks. Runs on the
workstation; nothing here is imported by the runtime."""
