"""Structured GQA-aware pruning: units -> importance -> plan -> surgery."""
