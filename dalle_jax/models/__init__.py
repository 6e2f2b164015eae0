"""Flax Linen models: the stage-1 image tokenizers (:mod:`dvae`, :mod:`vqvae`, chosen by
``config.model.kind`` in :mod:`image_tokenizers`), the import of OpenAI's released dVAE
and the stage-2 :mod:`transformer`. Models import nothing from the training core."""
