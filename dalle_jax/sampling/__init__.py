"""Sampling: KV-cached decoding, top-k/top-p, classifier-free guidance, priming,
variations and reranking. (Next milestones.)"""
