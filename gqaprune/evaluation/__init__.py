"""Evaluation: perplexity, zero-shot (lm-eval), offline tasks, speed and size."""
