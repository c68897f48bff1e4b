"""Quantization-error compensators: none, global low-rank, Quant Experts."""
