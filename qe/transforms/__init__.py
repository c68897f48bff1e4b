"""Transforms: changes of basis applied per smoothing group before weight quantization
(SmoothQuant-style smoothing, AWQ-style scale search, the per-group α search Quant Experts
asks for). A transform composes with any quantizer and any compensator."""
