"""Weight quantizers, quantization grids, packing and the quantized linear module."""
