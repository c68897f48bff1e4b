"""Export of qe checkpoints to the serving ecosystem (compressed-tensors, PEFT LoRA)."""
