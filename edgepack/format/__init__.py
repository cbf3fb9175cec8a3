"""The bundle format: manifest schema and version gate, file set and hashes, safetensors
reading (bundle.py, FORMAT.md), signatures (signing.py), checking a bundle (verify.py).
Needs only the standard library; the exporter writes through it and the runtime reads
through it."""
