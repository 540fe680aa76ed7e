"""Datasets of the experiments, built in memory as tensors."""
