"""Trained runs and exported bundles for inference: parameters only, placed on the mesh
you give.

:class:`~dalle_jax.inference.text_to_image.TextToImage` (``TextToImage.load(bundle)``)
generates images from prompts with an exported bundle (:mod:`.bundle`).
:func:`~dalle_jax.inference.runs.load_variables` reads a run's parameters (its EMA
when the run kept one) and non-gradient model state, never the optimizer's;
:class:`~dalle_jax.inference.image_tokenizer.ImageTokenizerRun` (stage 1) and
:class:`~dalle_jax.inference.transformer.TransformerRun` (stage 2) build on it.
"""
