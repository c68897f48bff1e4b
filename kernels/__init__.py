"""Triton kernels of the quantized forward and their torch reference twins.

Installed as ``qe.kernels`` (the folder is mapped in pyproject.toml) so that the top-level
name ``kernels`` stays free for Hugging Face's kernel hub package.
"""
