"""Stages: what each stage of DALL·E supplies to the shared training core (a Task)."""


def run_text_tokenizer(config, workdir, vocab_size: int):
    """The caption tokenizer of a run: trained on the captions of the train split on
    the first run (into ``<workdir>`` or ``config.text.tokenizer_path``), loaded after;
    a ValueError when it has more pieces than the model's ``vocab_size``."""
    from dalle_jax.data import sources  # pylint: disable=g-import-not-at-top
    from dalle_jax.data import text_tokenizer  # pylint: disable=g-import-not-at-top
    captions = sources.iter_captions(sources.make_source(config.data, "train"))
    tokenizer = text_tokenizer.train_or_load_text_tokenizer(config.text, workdir, captions,
                                                            progress=False)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model's "
                         f"text vocabulary is {vocab_size}")
    return tokenizer
