"""Evaluation: monitors of representation quality (k-NN)."""
