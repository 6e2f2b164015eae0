"""Text → image from an exported bundle: the API a notebook reaches for first.

    from dalle_jax.inference.text_to_image import TextToImage

    model = TextToImage.load("runs/demo/bundle")
    result = model.generate(["a red circle in the top left"], num_images=8, seed=0)
    result.images            # uint8 [prompts, num_images, H, W, 3]
    result.records[0]        # {"prompt": ..., "seed": 0, "index": 0, "settings": {...}}

    model.generate(["a blue star"], prime_image=png, prime_rows=4)  # complete an image
    model.variations(png, num_images=8)                            # resample its bottom
    model.generate(["a red circle"], upsample=True)   # 4x images by the diffusion upsampler

Image ``index`` of a prompt under a seed is drawn with its own key, made from the seed,
the prompt's text and the index: it is the same whatever the other prompts, the batch
size or the number of devices. Batches of prompts × images are padded to one size (one
compilation) and split over the mesh's data axes.
"""
from __future__ import annotations

import dataclasses
import os
import time
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
from dalle_jax.inference import reranker as reranker_lib
from dalle_jax.inference import transformer as transformer_run
from dalle_jax.inference import upsampler as upsampler_lib
from dalle_jax.models import image_tokenizers
from dalle_jax.sampling import sampler as sampler_lib
from dalle_jax.train import sharding as sharding_lib

DEFAULT_BATCH_SIZE = 64
UPSAMPLE_STREAM = 1  # folded into an image's key for its upsampling noise
PRIOR_STREAM, DECODER_STREAM = 2, 3  # folded into an image's key on unCLIP's path
PATHS = ("dalle", "unclip")  # text -> image: DALL·E's transformer, or unCLIP's prior + decoder


class GenerateError(errors.UserError, ValueError):
    """A request that cannot be generated (bad settings, a priming image, prompts)."""


@dataclasses.dataclass
class Generation:
    """The images of one request, prompt-major, and one record per image."""
    prompts: list[str]
    images: np.ndarray  # uint8 [len(prompts), num_images, H, W, 3]
    codes: np.ndarray | None  # int32 [len(prompts), num_images, h, w] (None: unCLIP's path)
    records: list[dict[str, Any]]  # prompt-major: record of image j of prompt i at i·n + j
    scores: np.ndarray | None = None  # float32 [len(prompts), num_images]: the reranker's
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds by part
    candidates: "Generation | None" = None  # every candidate, when reranking with keep_all
    low_res: np.ndarray | None = None  # uint8 [P, n, h, w, 3]: the stage-1 images, upsampled

    @property
    def reranked(self) -> bool:
        return bool(self.records) and "rank" in self.records[0]

    def image(self, prompt_index: int, index: int) -> np.ndarray:
        return self.images[prompt_index, index]


def image_key(seed: int, prompt: str, index: int) -> jax.Array:
    """The key of image ``index`` of ``prompt`` under ``seed``."""
    return image_keys(seed, [prompt], [index])[0]


def image_keys(seed: int, prompts: Sequence[str], indices: Sequence[int]) -> jax.Array:
    """The keys of images ``indices[i]`` of ``prompts[i]`` under ``seed``, in one call."""
    prompt_ids = np.array([zlib.crc32(p.encode()) >> 1 for p in prompts], np.uint32)
    return _fold_keys(jax.random.key(int(seed)), jnp.asarray(prompt_ids),
                      jnp.asarray(np.asarray(indices, np.uint32)))


@jax.jit
def _fold_keys(key: jax.Array, prompt_ids: jax.Array, indices: jax.Array) -> jax.Array:
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, 0))
    return fold(fold(jnp.broadcast_to(key, prompt_ids.shape), prompt_ids), indices)


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
        self.reranker = None
        if bundle.reranker is not None:
            r = bundle.reranker
            self.reranker = reranker_lib.Reranker(
                r.config, r.params, r.text_tokenizer, bundle.mesh,
                int(parts["reranker"]["source"].get("step", 0)))
        self.upsampler = None
        if bundle.upsampler is not None:
            u = bundle.upsampler
            self.upsampler = upsampler_lib.Upsampler(
                u.config, u.params, bundle.mesh,
                int(parts["upsampler"]["source"].get("step", 0)))
        self.unclip_decoder = None  # unCLIP's decoder and prior (optional parts)
        if bundle.unclip_decoder is not None:
            from dalle_jax.inference import unclip  # pylint: disable=g-import-not-at-top
            d = bundle.unclip_decoder
            self.unclip_decoder = unclip.UnclipDecoder(
                d.config, d.params, self.reranker, bundle.mesh,
                int(parts["unclip_decoder"]["source"].get("step", 0)))
        self.unclip_prior = None
        if bundle.unclip_prior is not None:
            from dalle_jax.inference import prior as prior_lib  # pylint: disable=g-import-not-at-top
            p = bundle.unclip_prior
            self.unclip_prior = prior_lib.Prior(
                p.config, p.params, self.reranker, bundle.mesh,
                int(parts["unclip_prior"]["source"].get("step", 0)))
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
                 prime_rows: int = 0, candidates: int | None = None,
                 keep_all: bool = False, upsample: bool = False,
                 upsample_steps: int | None = None, upsample_eta: float | None = None,
                 upsample_noise_level: float | None = None,
                 upsample_t_start: float | None = None, path: str = "dalle",
                 prior_steps: int | None = None, prior_guidance_scale: float | None = None,
                 prior_best_of: int = 1, decoder_steps: int | None = None,
                 decoder_eta: float | None = None,
                 decoder_guidance_scale: float | None = None, progress: bool = False,
                 warn: Callable[[str], None] = logging.warning,
                 on_batch: Callable[[list[tuple[int, int]], np.ndarray], None] | None = None
                 ) -> Generation:
        """``num_images`` images for each prompt.

        Sampling settings default to the bundle's (its run's ``config.stage2.sample``).
        ``prime_image`` (a path, PIL image or array) with ``prime_rows`` = K keeps the
        top K rows of its codes and samples the rest (completion, variations).

        ``candidates`` = N > ``num_images`` draws N images per prompt and keeps the
        ``num_images`` that the bundle's reranker scores best (their records carry the
        score, the rank and the candidate's index; ``keep_all`` also returns every
        candidate as ``Generation.candidates``). Candidate j of a prompt is the image
        that ``num_images`` > j would have given without reranking. With a reranker
        every image is scored, reranked or not.

        ``upsample`` runs the bundle's diffusion upsampler on the kept images (after
        reranking, which scores the stage-1 images): ``images`` are then 4× the size and
        ``low_res`` holds the stage-1 ones. DDIM steps, eta, the input's noise level and
        the start time (< 1: from bicubic, noised) default to the upsampler's run
        (``config.diffusion.sample``).

        ``path="unclip"`` draws the images through unCLIP's prior (caption → image
        embedding; ``prior_steps``, ``prior_guidance_scale``, ``prior_best_of`` = 2 keeps
        the embedding nearer the caption's of two) and decoder (embedding → image;
        ``decoder_steps``, ``decoder_eta``, ``decoder_guidance_scale``) instead of the
        transformer; reranking and upsampling work the same. The transformer's sampling
        settings and priming do not apply there.

        A progress bar (``progress``) counts batches; ``on_batch(rows, images)`` sees
        each batch's (prompt index, image index) rows and images as they are made (not
        when reranking: the kept images are known at the end).
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
        draws = self._candidates(candidates, num_images)
        reranking = draws > num_images
        if path not in PATHS:
            raise GenerateError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
        unclip_settings = None
        if path == "unclip":
            given = [n for n, v in (("temperature", temperature), ("top_k", top_k),
                                    ("top_p", top_p), ("guidance_scale", guidance_scale),
                                    ("prime_image", prime_image)) if v is not None]
            if given or prime_rows:
                raise GenerateError(f"{', '.join(given) or 'prime_rows'}: the transformer's "
                                    "settings do not apply to path='unclip' (its prior and "
                                    "decoder take prior_* and decoder_* settings)")
            unclip_settings = self._unclip_settings(prior_steps, prior_guidance_scale,
                                                    prior_best_of, decoder_steps,
                                                    decoder_eta, decoder_guidance_scale)
        elif any(v is not None for v in (prior_steps, prior_guidance_scale, decoder_steps,
                                          decoder_eta, decoder_guidance_scale)) \
                or prior_best_of != 1:
            raise GenerateError("prior_* and decoder_* settings are unCLIP's: pass "
                                "path='unclip'")
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
        rows = [(p, j) for p in range(len(prompts)) for j in range(draws)]
        size = self._batch_size(batch_size, len(rows))
        keys = image_keys(seed, [prompts[p] for p, _ in rows], [j for _, j in rows])
        h = w = grid
        codes = np.zeros((len(rows), h, w), np.int32)
        images = np.zeros((len(rows), self.image_size, self.image_size, 3), np.uint8)
        scores = np.full((len(rows),), np.nan, np.float32)
        timings = {"sample_s": 0.0, "decode_s": 0.0, "score_s": 0.0}
        starts = range(0, len(rows), size)
        upsample_settings = None
        if upsample:
            upsample_settings = self._upsample_settings(
                upsample_steps, upsample_eta, upsample_noise_level, upsample_t_start)
        bar = tqdm.tqdm(starts, desc="generating", unit="batch", disable=not progress)
        for start in bar:
            chunk = rows[start:start + size]
            index = list(range(start, start + len(chunk)))
            pad = size - len(chunk)
            index_padded = index + [index[-1]] * pad
            batch_keys = keys[np.asarray(index_padded)]
            text = tokens[[rows[i][0] for i in index_padded]]
            kwargs = {}
            if prime_codes is not None:
                kwargs = dict(prime_codes=np.repeat(prime_codes, len(index_padded), 0),
                              prime_rows=prime_rows)
            if unclip_settings is not None:
                images[index] = self._unclip_draw([prompts[p] for p, _ in chunk],
                                                  batch_keys[:len(chunk)], unclip_settings,
                                                  timings)
            else:
                began = time.perf_counter()
                batch_codes = self.sampler.sample(text, keys=batch_keys, settings=settings,
                                                  **kwargs)
                timings["sample_s"] += time.perf_counter() - began
                began = time.perf_counter()
                batch_images = self.decode(batch_codes)
                timings["decode_s"] += time.perf_counter() - began
                codes[index] = batch_codes[:len(chunk)]
                images[index] = batch_images[:len(chunk)]
            if self.reranker is not None:
                began = time.perf_counter()
                scores[index] = self.reranker.scores(images[index],
                                                     [prompts[p] for p, _ in chunk])
                timings["score_s"] += time.perf_counter() - began
            if on_batch is not None and not reranking and not upsample:
                on_batch(chunk, images[index])
        bar.close()

        prime = None
        if prime_codes is not None:
            prime = {"image": (os.fspath(prime_image) if isinstance(prime_image,
                                                                     (str, os.PathLike))
                               else "array"), "rows": prime_rows, "note": prime_note}
        scored = self.reranker is not None
        if unclip_settings is None:
            base = {"seed": seed, "settings": dataclasses.asdict(settings), "prime": prime}
        else:
            base = {"seed": seed, "path": "unclip",
                    "settings": {"prior": dataclasses.asdict(unclip_settings[0]),
                                 "prior_best_of": unclip_settings[1],
                                 "decoder": dataclasses.asdict(unclip_settings[2])},
                    "prior_step": self.unclip_prior.step,
                    "decoder_step": self.unclip_decoder.step}
        base.update({**({"upsample": dataclasses.asdict(upsample_settings)} if upsample
                        else {}),
                     "bundle": str(self.bundle.path),
                     "transformer_step": self.transformer.step})
        count = len(prompts)
        scores = scores.reshape(count, draws)
        order = (reranker_lib.rank(scores) if reranking
                 else np.broadcast_to(np.arange(draws), (count, draws)))
        ranks = np.argsort(order, axis=1)  # rank of each candidate

        def record(p: int, index: int, candidate: int) -> dict[str, Any]:
            r = {"prompt": prompts[p], "prompt_index": p, "index": index,
                 **base, "truncated": bool(truncated[p]),
                 "score": float(scores[p, candidate]) if scored else None}
            if reranking:
                r.update(candidate=candidate, rank=int(ranks[p, candidate]),
                         candidates=draws)
            return r

        images = images.reshape((count, draws) + images.shape[1:])
        codes = None if unclip_settings is not None else codes.reshape(count, draws, h, w)
        kept = order[:, :num_images]
        result = Generation(
            prompts, np.take_along_axis(images, kept[:, :, None, None, None], 1),
            None if codes is None else np.take_along_axis(codes, kept[:, :, None, None], 1),
            [record(p, i, int(kept[p, i])) for p in range(count) for i in range(num_images)],
            scores=np.take_along_axis(scores, kept, 1) if scored else None,
            timings=timings)
        if upsample:
            kept_rows = (np.arange(count)[:, None] * draws + kept).reshape(-1)
            self._upsample(result, keys[kept_rows], upsample_settings)
        if keep_all and reranking:
            result.candidates = Generation(
                prompts, images, codes,
                [record(p, j, j) for p in range(count) for j in range(draws)],
                scores=scores)
        return result

    def _unclip_settings(self, prior_steps, prior_guidance_scale, prior_best_of,
                         decoder_steps, decoder_eta, decoder_guidance_scale):
        """(prior settings, best_of, decoder settings), checked."""
        from dalle_jax.inference import prior as prior_lib  # pylint: disable=g-import-not-at-top
        from dalle_jax.inference import unclip  # pylint: disable=g-import-not-at-top
        self._require_unclip(prior=True)
        if isinstance(prior_best_of, bool) or int(prior_best_of) != prior_best_of \
                or prior_best_of < 1:
            raise GenerateError(f"prior_best_of must be a positive integer, got "
                                f"{prior_best_of!r}")
        try:
            return (self.unclip_prior.settings(prior_steps, None, prior_guidance_scale),
                    int(prior_best_of),
                    self.unclip_decoder.settings(decoder_steps, decoder_eta,
                                                 decoder_guidance_scale))
        except (prior_lib.PriorError, unclip.UnclipError) as e:
            raise GenerateError(str(e)) from None

    def _unclip_draw(self, prompts: list[str], keys: jax.Array, settings,
                     timings: dict[str, float]) -> np.ndarray:
        """Images of ``prompts`` through unCLIP's prior and decoder, row ``i`` drawn from
        ``keys[i]`` (folded apart for the prior's and the decoder's noise)."""
        prior, best_of, decoder = settings
        began = time.perf_counter()
        emb = self.unclip_prior.sample(
            prompts, keys=jax.vmap(lambda k: jax.random.fold_in(k, PRIOR_STREAM))(keys),
            steps=prior.steps, eta=prior.eta, guidance_scale=prior.guidance_scale,
            best_of=best_of)
        timings["prior_s"] = timings.get("prior_s", 0.0) + time.perf_counter() - began
        began = time.perf_counter()
        images = self.unclip_decoder.decode(
            emb, keys=jax.vmap(lambda k: jax.random.fold_in(k, DECODER_STREAM))(keys),
            steps=decoder.steps, eta=decoder.eta, guidance_scale=decoder.guidance_scale)
        timings["sample_s"] += time.perf_counter() - began
        return images

    def _upsample_settings(self, steps, eta, noise_level, t_start
                           ) -> upsampler_lib.UpsampleSettings:
        if self.upsampler is None:
            raise GenerateError(
                f"bundle {self.bundle.path} has no upsampler: export it with "
                "--upsampler=<an upsampler run> (dalle_jax.tools.export)")
        try:
            return self.upsampler.settings(steps, eta, noise_level, t_start)
        except upsampler_lib.UpsampleError as e:
            raise GenerateError(str(e)) from None

    def _upsample(self, result: Generation, keys: jax.Array,
                  settings: upsampler_lib.UpsampleSettings) -> None:
        """Replaces ``result.images`` by their 4× upsampling (the originals move to
        ``low_res``); ``keys`` [P·n] are the images' own keys, folded for the upsampler's
        noise (independent of the noise that drew the image)."""
        began = time.perf_counter()
        up_keys = jax.vmap(lambda k: jax.random.fold_in(k, UPSAMPLE_STREAM))(keys)
        count, num_images = result.images.shape[:2]
        low = result.images.reshape((-1,) + result.images.shape[2:])
        high = self.upsampler.upsample(low, keys=up_keys, steps=settings.steps,
                                       eta=settings.eta, noise_level=settings.noise_level,
                                       t_start=settings.t_start)
        result.low_res = result.images
        result.images = high.reshape((count, num_images) + high.shape[1:])
        result.timings["upsample_s"] = time.perf_counter() - began

    def _candidates(self, candidates: int | None, num_images: int) -> int:
        """Images to draw per prompt: ``candidates``, checked."""
        if candidates is None:
            return num_images
        if isinstance(candidates, bool) or int(candidates) != candidates or candidates < 1:
            raise GenerateError(f"candidates must be a positive integer, got {candidates!r}")
        candidates = int(candidates)
        if candidates < num_images:
            raise GenerateError(f"candidates ({candidates}) must be at least num_images "
                                f"({num_images}): the best num_images of them are kept")
        if candidates > num_images and self.reranker is None:
            raise GenerateError(
                f"bundle {self.bundle.path} has no reranker, so it cannot keep the best "
                f"{num_images} of {candidates} candidates: export it with "
                "--reranker=<a contrastive run> (dalle_jax.tools.export)")
        return candidates

    def variations_path(self, path: str | None = None) -> str:
        """The path variations take: ``path``, or by default unCLIP's decoder when the
        bundle carries one and DALL·E's priming otherwise."""
        if path is None:
            return "unclip" if self.unclip_decoder is not None else "dalle"
        if path not in PATHS:
            raise GenerateError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
        return path

    def variations(self, image: Any, num_images: int = 8, *, path: str | None = None,
                   prompt: str = "", prime_rows: int | None = None, seed: int = 0,
                   **kwargs: Any) -> Generation:
        """``num_images`` variations of ``image``.

        On unCLIP's path (the default when the bundle has the decoder): the image's
        contrastive embedding decoded with ``num_images`` seeds (:meth:`unclip_variations`,
        which takes the keyword arguments). On DALL·E's: the top ``prime_rows`` rows of its
        codes kept (half the grid by default), the rest resampled under ``prompt`` (the
        empty caption by default: unconditional)."""
        if self.variations_path(path) == "unclip":
            if prompt or prime_rows is not None:
                raise GenerateError("unCLIP's variations decode the image's embedding: they "
                                    "take no prompt and no prime_rows (path='dalle' does)")
            return self.unclip_variations(image, num_images, seed=seed, **kwargs)
        if prime_rows is None:
            prime_rows = self.grid_size // 2
        return self.generate([prompt], num_images, seed=seed, prime_image=image,
                             prime_rows=prime_rows, **kwargs)

    def _require_unclip(self, prior: bool = False) -> None:
        if self.unclip_decoder is None or (prior and self.unclip_prior is None):
            need = "--unclip_decoder" + (" and --unclip_prior" if prior else "")
            what = "unCLIP's decoder" + (" and prior" if prior else "")
            raise GenerateError(
                f"bundle {self.bundle.path} has no {what}: export it with --reranker and "
                f"{need} (dalle_jax.tools.export)")

    def unclip_variations(self, image: Any, num_images: int = 8, *, seed: int = 0,
                          decoder_steps: int | None = None, decoder_eta: float | None = None,
                          decoder_guidance_scale: float | None = None,
                          from_inversion: bool = False, upsample: bool = False,
                          upsample_steps: int | None = None,
                          upsample_eta: float | None = None,
                          upsample_noise_level: float | None = None,
                          upsample_t_start: float | None = None, progress: bool = False,
                          warn: Callable[[str], None] = logging.warning) -> Generation:
        """unCLIP's variations of ``image`` (a path, PIL image or uint8 array at the
        bundle's size): its embedding decoded with seeds; ``from_inversion`` starts from
        the image's DDIM inversion (η = 0 then returns the image). Each is scored against
        nothing (there is no prompt); ``upsample`` runs the upsampler after."""
        del progress, warn  # one batch: no bar; nothing is truncated
        from dalle_jax.inference import unclip  # pylint: disable=g-import-not-at-top
        self._require_unclip()
        if isinstance(num_images, bool) or int(num_images) != num_images or num_images < 1:
            raise GenerateError(f"num_images must be a positive integer, got {num_images!r}")
        if isinstance(seed, bool) or int(seed) != seed or not 0 <= seed < 2**63:
            raise GenerateError(f"seed must be a non-negative integer, got {seed!r}")
        num_images, seed = int(num_images), int(seed)
        decoder = self.unclip_decoder
        upsample_settings = (self._upsample_settings(upsample_steps, upsample_eta,
                                                     upsample_noise_level, upsample_t_start)
                             if upsample else None)
        try:
            settings = decoder.settings(decoder_steps, decoder_eta, decoder_guidance_scale)
            began = time.perf_counter()
            keys = image_keys(seed, [""] * num_images, range(num_images))
            images = decoder.variations(image, num_images, keys=keys, steps=settings.steps,
                                        eta=settings.eta,
                                        guidance_scale=settings.guidance_scale,
                                        from_inversion=bool(from_inversion))
        except unclip.UnclipError as e:
            raise GenerateError(str(e)) from None
        timings = {"sample_s": time.perf_counter() - began}
        source = os.fspath(image) if isinstance(image, (str, os.PathLike)) else "array"
        base = {"seed": seed, "path": "unclip", "variations_of": source,
                "from_inversion": bool(from_inversion),
                "settings": {"decoder": dataclasses.asdict(settings)},
                **({"upsample": dataclasses.asdict(upsample_settings)} if upsample else {}),
                "bundle": str(self.bundle.path), "decoder_step": decoder.step}
        records = [{"prompt": "", "prompt_index": 0, "index": j, **base, "truncated": False,
                    "score": None} for j in range(num_images)]
        result = Generation([""], images[None], None, records, timings=timings)
        if upsample:
            self._upsample(result, keys, upsample_settings)
        return result


def iter_prompts_file(path: str | os.PathLike) -> Iterable[str]:
    """The prompts of a file, one per line; blank lines and lines starting with # are
    skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line
