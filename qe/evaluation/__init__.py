"""Evaluation: perplexity, caption likelihood, layer errors."""
