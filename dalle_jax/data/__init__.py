"""Datasets and text processing for dalle_jax."""
