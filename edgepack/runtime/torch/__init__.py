"""The torch backend: bundles the C engine cannot run (other architectures, nf4/fp4, GPUs)
built as torch modules from the stored tensors (model.py), the CPU Llama decoder
(llama.py) and the quantized linear layers both use (linear.py)."""
