"""Flax Linen models, chosen by name from config: the stage-1 image tokenizers (dVAE,
VQ-VAE), the stage-2 transformer and the contrastive reranker. (Next milestones.)"""
