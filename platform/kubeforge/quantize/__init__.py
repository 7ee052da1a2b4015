"""Quantization: compress the pipeline's model for serving, checked against the unquantized one.

`llmc` runs in the quantize environment (llm-compressor; see kubeforge.envs); `perplexity` runs in
both environments.
"""
