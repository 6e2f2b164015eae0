"""Text → image from an exported bundle: the API a notebook reaches for first.

    from dalle_jax.inference.text_to_image import TextToImage

    model = TextToImage.load("runs/demo/bundle")
    result = model.generate(["a red circle in the top left"], num_images=8, seed=0)
    result.images            # uint8 [prompts, num_images, H, W, 3]
    result.records[0]        # {"prompt": ..., "seed": 0, "index": 0, "settings": {...}}

    model.generate(["a blue star"], prime_image=png, prime_rows=4)  # complete an image
    model.variations(png, num_images=8)                            # resample its bottom

Image ``index`` of a prompt under a seed is drawn with its own key, made from the seed,
the prompt's text and the index: it is the same whatever the other prompts, the batch
size or the number of devices. Batches of prompts × images are padded to one size (one
compilation) and split over the mesh's data axes.
"""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError
import tqdm

from dalle_jax import errors
from dalle_jax.inference import bundle as bundle_lib
from dalle_jax.inference import image_tokenizer as image_tokenizer_run
from dalle_jax.inference import transformer as transformer_run
from dalle_jax.models import image_tokenizers
from dalle_jax.sampling import sampler as sampler_lib
from dalle_jax.train import sharding as sharding_lib

DEFAULT_BATCH_SIZE = 64


class GenerateError(errors.UserError, ValueError):
    """A request that cannot be generated (bad settings, a priming image, prompts)."""


@dataclasses.dataclass
class Generation:
    """The images of one request, prompt-major, and one record per image."""
    prompts: list[str]
    images: np.ndarray  # uint8 [len(prompts), num_images, H, W, 3]
    codes: np.ndarray  # int32 [len(prompts), num_images, h, w]
    records: list[dict[str, Any]]  # prompt-major: record of image j of prompt i at i·n + j

    def image(self, prompt_index: int, index: int) -> np.ndarray:
        return self.images[prompt_index, index]


def image_key(seed: int, prompt: str, index: int) -> jax.Array:
    """The key of image ``index`` of ``prompt`` under ``seed``."""
    key = jax.random.fold_in(jax.random.key(int(seed)), zlib.crc32(prompt.encode()) >> 1)
    return jax.random.fold_in(key, index)


def read_image(image: Any, size: int, *, name: str = "the image"
               ) -> tuple[np.ndarray, str | None]:
    """A priming image as uint8 [size, size, 3], and a note when it had to be changed.

    ``image`` is a path, a PIL image or an array (uint8, or floats in [0, 1]). A
    non-square image is centre-cropped and any other size resized (bicubic); the note
    says so. Anything that is not an image raises :class:`GenerateError`.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise GenerateError(f"{name} {path} not found")
        try:
            with Image.open(path) as opened:
                opened.load()
                pil = opened.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise GenerateError(f"{name} {path} is not an image PIL can read "
                                f"({type(e).__name__})") from None
    elif isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] == 4:
            array = array[..., :3]
        if array.ndim != 3 or array.shape[-1] != 3:
            raise GenerateError(f"{name} must be [H, W, 3], got shape {array.shape}")
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise GenerateError(f"{name}: float pixels must lie in [0, 1]")
            array = np.round(array * 255).astype(np.uint8)
        elif array.dtype != np.uint8:
            raise GenerateError(f"{name} must be uint8 or float, got {array.dtype}")
        pil = Image.fromarray(array)
    width, height = pil.size
    notes = []
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        pil = pil.crop((left, top, left + side, top + side))
        notes.append(f"centre-cropped from {width}x{height} to {side}x{side}")
    if pil.size != (size, size):
        notes.append(f"resized from {pil.size[0]}x{pil.size[1]} to the model's {size}x{size}")
        pil = pil.resize((size, size), Image.BICUBIC)
    note = f"{name}: " + ", then ".join(notes) if notes else None
    return np.asarray(pil, np.uint8), note


class TextToImage:
    """A bundle's transformer, image tokenizer and caption tokenizer, ready to sample."""

    def __init__(self, bundle: bundle_lib.Bundle):
        self.bundle = bundle
        config = bundle.transformer_config
        parts = bundle.manifest["parts"]
        self.transformer = transformer_run.TransformerRun(
            config, transformer_run.stage2.model_config(config), bundle.transformer_params,
            int(parts["transformer"]["source"].get("step", 0)), bundle.mesh)
        i_config = bundle.image_tokenizer_config
        self.image_tokenizer = image_tokenizer_run.ImageTokenizerRun(
            i_config, image_tokenizers.from_config(i_config.model),
            bundle.image_tokenizer_variables,
            int(parts["image_tokenizer"]["source"].get("step", 0)))
        self.text_tokenizer = bundle.text_tokenizer
        self.sampler = self.transformer.sampler()
        sample = config.get("stage2", {}).get("sample", {})
        self.default_settings = sampler_lib.SamplingSettings(
            temperature=float(sample.get("temperature", 1.0)),
            top_k=int(sample.get("top_k", 0)), top_p=float(sample.get("top_p", 1.0)),
            guidance_scale=float(sample.get("guidance_scale", 1.0)))

    @classmethod
    def load(cls, path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None
             ) -> "TextToImage":
        """The bundle at ``path`` (``dalle_jax.tools.export``), verified, its arrays on
        ``mesh`` (by default this host's devices along the batch axis)."""
        return cls(bundle_lib.load(path, mesh))

    # ------------------------------------------------------------------ properties

    @property
    def image_size(self) -> int:
        return self.image_tokenizer.image_size

    @property
    def grid_size(self) -> int:
        return self.transformer.model_config.image_height

    @property
    def text_len(self) -> int:
        return self.transformer.model_config.text_len

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.transformer.mesh

    def encode(self, images: Any) -> np.ndarray:
        """uint8 images [B, H, W, 3] → codes int32 [B, h, w]."""
        return self.image_tokenizer.encode(images)

    def decode(self, codes: Any) -> np.ndarray:
        """Codes int [B, h, w] → uint8 images [B, H, W, 3]."""
        return self.image_tokenizer.decode(codes)

    # ------------------------------------------------------------------ generation

    def settings(self, **overrides: Any) -> sampler_lib.SamplingSettings:
        """The bundle's sampling settings with ``overrides`` (None keeps a default),
        checked: a bad value raises :class:`GenerateError` naming it."""
        values = dataclasses.asdict(self.default_settings)
        for name, value in overrides.items():
            if name not in values:
                raise GenerateError(f"unknown sampling setting {name!r}")
            if value is None:
                continue
            kind = int if name == "top_k" else float
            try:
                if isinstance(value, bool) or (kind is int and float(value) != int(value)):
                    raise ValueError
                values[name] = kind(value)
            except (TypeError, ValueError):
                raise GenerateError(f"{name} must be {'an integer' if kind is int else 'a number'}"
                                    f", got {value!r}") from None
        settings = sampler_lib.SamplingSettings(**values)
        try:
            settings.check(self.transformer.model_config.image_vocab_size)
        except ValueError as e:
            raise GenerateError(str(e)) from None
        return settings

    def _batch_size(self, batch_size: int | None, rows: int) -> int:
        shards = sharding_lib.batch_shard_count(self.mesh)
        if batch_size is None:
            batch_size = min(DEFAULT_BATCH_SIZE, rows)
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise GenerateError(f"batch_size must be a positive integer, got {batch_size!r}")
        return -(-int(batch_size) // shards) * shards

    def tokenize(self, prompts: Sequence[str],
                 warn: Callable[[str], None] = logging.warning) -> tuple[np.ndarray, np.ndarray]:
        """Prompts → text tokens [P, text_len] and which were truncated (each is warned
        about by name)."""
        tokens, truncated = self.text_tokenizer.encode(list(prompts))
        for i, (prompt, cut) in enumerate(zip(prompts, truncated)):
            if cut:
                warn(f"prompt {i + 1} is longer than the model's {self.text_len} text tokens "
                     f"and was truncated: {prompt!r}")
        return tokens, truncated

    def generate(self, prompts: str | Sequence[str], num_images: int = 8, *, seed: int = 0,
                 temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, guidance_scale: float | None = None,
                 batch_size: int | None = None, prime_image: Any = None,
                 prime_rows: int = 0, progress: bool = False,
                 warn: Callable[[str], None] = logging.warning,
                 on_batch: Callable[[list[tuple[int, int]], np.ndarray], None] | None = None
                 ) -> Generation:
        """``num_images`` images for each prompt.

        Sampling settings default to the bundle's (its run's ``config.stage2.sample``).
        ``prime_image`` (a path, PIL image or array) with ``prime_rows`` = K keeps the
        top K rows of its codes and samples the rest (completion, variations). A
        progress bar (``progress``) counts batches; ``on_batch(rows, images)`` sees each
        batch's (prompt index, image index) rows and images as they are made.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise GenerateError("no prompts to generate from")
        if isinstance(num_images, bool) or int(num_images) != num_images or num_images < 1:
            raise GenerateError(f"num_images must be a positive integer, got {num_images!r}")
        if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**63:
            raise GenerateError(f"seed must be a non-negative integer, got {seed!r}")
        num_images, seed = int(num_images), int(seed)
        settings = self.settings(temperature=temperature, top_k=top_k, top_p=top_p,
                                 guidance_scale=guidance_scale)
        grid = self.grid_size
        prime_codes, prime_note = None, None
        if isinstance(prime_rows, bool) or int(prime_rows) != prime_rows:
            raise GenerateError(f"prime_rows must be an integer, got {prime_rows!r}")
        prime_rows = int(prime_rows)
        if prime_image is not None:
            if not 1 <= prime_rows <= grid:
                raise GenerateError(f"prime_rows must lie in [1, {grid}] (the code grid has "
                                    f"{grid} rows), got {prime_rows}")
            pixels, prime_note = read_image(prime_image, self.image_size,
                                            name="the priming image")
            if prime_note:
                warn(prime_note)
            prime_codes = self.encode(pixels[None])
        elif prime_rows:
            raise GenerateError("prime_rows needs a priming image")

        tokens, truncated = self.tokenize(prompts, warn)
        rows = [(p, j) for p in range(len(prompts)) for j in range(num_images)]
        size = self._batch_size(batch_size, len(rows))
        keys = [image_key(seed, prompts[p], j) for p, j in rows]
        h = w = grid
        codes = np.zeros((len(rows), h, w), np.int32)
        images = np.zeros((len(rows), self.image_size, self.image_size, 3), np.uint8)
        starts = range(0, len(rows), size)
        bar = tqdm.tqdm(starts, desc="generating", unit="batch", disable=not progress)
        for start in bar:
            chunk = rows[start:start + size]
            index = list(range(start, start + len(chunk)))
            pad = size - len(chunk)
            index_padded = index + [index[-1]] * pad
            batch_keys = jnp.stack([keys[i] for i in index_padded])
            text = tokens[[rows[i][0] for i in index_padded]]
            kwargs = {}
            if prime_codes is not None:
                kwargs = dict(prime_codes=np.repeat(prime_codes, len(index_padded), 0),
                              prime_rows=prime_rows)
            batch_codes = self.sampler.sample(text, keys=batch_keys, settings=settings,
                                              **kwargs)
            batch_images = self.decode(batch_codes)
            codes[index] = batch_codes[:len(chunk)]
            images[index] = batch_images[:len(chunk)]
            if on_batch is not None:
                on_batch(chunk, images[index])
        bar.close()

        step = self.transformer.step
        prime = None
        if prime_codes is not None:
            prime = {"image": (os.fspath(prime_image) if isinstance(prime_image,
                                                                     (str, os.PathLike))
                               else "array"), "rows": prime_rows, "note": prime_note}
        records = [{
            "prompt": prompts[p], "prompt_index": p, "index": j, "seed": seed,
            "settings": dataclasses.asdict(settings), "prime": prime,
            "truncated": bool(truncated[p]), "bundle": str(self.bundle.path),
            "transformer_step": step,
        } for p, j in rows]
        n = num_images
        return Generation(prompts, images.reshape((len(prompts), n) + images.shape[1:]),
                          codes.reshape(len(prompts), n, h, w), records)

    def variations(self, image: Any, num_images: int = 8, *, prompt: str = "",
                   prime_rows: int | None = None, seed: int = 0, **kwargs: Any) -> Generation:
        """``num_images`` variations of ``image``: the top ``prime_rows`` rows of its
        codes kept (half the grid by default), the rest resampled under ``prompt`` (the
        empty caption by default: unconditional)."""
        if prime_rows is None:
            prime_rows = self.grid_size // 2
        return self.generate([prompt], num_images, seed=seed, prime_image=image,
                             prime_rows=prime_rows, **kwargs)


def iter_prompts_file(path: str | os.PathLike) -> Iterable[str]:
    """The prompts of a file, one per line; blank lines and lines starting with # are
    skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line
