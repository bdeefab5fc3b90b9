"""Text generation for the causal LM families (gpt2, decoder, gemma, phi3): ``nnxport.generate``.

One jit-compiled function runs the prefill (the whole prompt written into a fixed-size KV cache) and a
``jax.lax.while_loop`` of one-token steps; nothing is recompiled per token. Shapes are bucketed: the prompt is
left-padded to a multiple of :data:`~nnxport.models.layers.CACHE_BUCKET` (64) positions and the cache holds
``prompt bucket + max_new_tokens`` rounded up to the next multiple of 64, so one compilation serves every
prompt length and ``max_new_tokens`` within a (batch, bucket) pair (and the sampling settings, which change
the graph: greedy or not, top_k, top_p, temperature).

Semantics follow transformers' ``generate`` (5.x): positions are ``cumsum(attention_mask) - 1`` (0 at
padding), each new token's position is the previous last position + 1, the first new token comes from the
logits at the prompt's last column, and masks are causal over cache slots (sliding windows too). So a
left-padded batch generates what each unpadded prompt generates; with right padding the results are
transformers' (which warns about it: the first new token is predicted at a padding position), token for
token. A row that produced ``eos_token_id`` continues with ``pad_token_id`` (default: the eos id), and
generation stops early once every row has finished, so the result may be shorter than prompt +
``max_new_tokens``, as transformers' is.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxport.errors import NnxportError, one_line, option
from nnxport.models.layers import KVCache, bucket_length, generation_positions

__all__ = ["TRACES", "CausalLM", "generate"]

#: How often the prefill and the step function were traced (compiled), by name: a Python side effect that
#: runs only while jax traces, so tests and users can check that a generation compiled once.
TRACES: collections.Counter[str] = collections.Counter()


@runtime_checkable
class CausalLM(Protocol):
    """What a model needs for :func:`generate` (the gpt2 and decoder families have it)."""

    #: The longest position the model has (a learned position table), or None (rotary embeddings).
    max_positions: int | None

    def init_cache(self, batch: int, max_len: int) -> KVCache: ...

    def decode(self, input_ids: jax.Array, positions: jax.Array, mask: jax.Array, cache: KVCache
               ) -> tuple[jax.Array, KVCache]: ...


@dataclass(frozen=True)
class Sampler:
    """Next-token choice from float32 logits: argmax at temperature 0; otherwise transformers' warpers in
    its order (temperature, top-k, top-p) and a categorical draw."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32)
        if self.temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p is not None and self.top_p < 1.0:
            order = jnp.argsort(logits, axis=-1)  # ascending, as TopPLogitsWarper
            ascending = jnp.take_along_axis(logits, order, axis=-1)
            remove = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1) <= 1.0 - self.top_p
            remove = remove.at[..., -1].set(False)  # keep at least the most likely token
            rows = jnp.arange(logits.shape[0])[:, None]
            logits = jnp.where(jnp.zeros_like(remove).at[rows, order].set(remove), -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler", "max_len"))
def _run(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array, positions: jax.Array,
         budget: jax.Array, key: jax.Array, eos: jax.Array, pad: jax.Array, *, sampler: Sampler,
         max_len: int) -> tuple[jax.Array, jax.Array]:
    """Prefill and up to ``budget`` steps. Returns the new tokens [B, max_len - T] (columns past the
    number of steps hold ``pad``) and the number of steps run."""
    model = nnx.merge(graphdef, state)
    batch, length = ids.shape
    TRACES["prefill"] += 1
    logits, cache = model.decode(ids, positions, mask, model.init_cache(batch, max_len))
    last_pos = positions[:, -1]

    def step(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        i, logits, cache, out, done, key = carry
        TRACES["step"] += 1
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad, sampler(logits, sub))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, i))
        done = done | jnp.isin(token, eos)
        pos = (last_pos + 1 + i)[:, None]

        def advance(cache: Any) -> tuple[jax.Array, Any]:
            new, cache = model.decode(token[:, None], pos, jnp.ones((batch, 1), jnp.int32), cache)
            return new[:, -1], cache

        # The last token needs no forward pass of its own (a whole pass over the weights when they are
        # read lazily, as streamed parity does).
        logits, cache = jax.lax.cond(i + 1 < budget, advance, lambda cache: (logits, cache), cache)
        return i + 1, logits, cache, out, done, key

    def more(carry: tuple[Any, ...]) -> jax.Array:
        i, _, _, _, done, _ = carry
        return (i < budget) & ~jnp.all(done)

    out = jnp.full((batch, max_len - length), pad, jnp.int32)
    start = (jnp.zeros((), jnp.int32), logits[:, -1], cache, out, jnp.zeros((batch,), bool), key)
    steps, _, _, out, _, _ = jax.lax.while_loop(more, step, start)
    return out, steps


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int | np.integer) else list(eos_token_id)
    if not all(isinstance(i, int | np.integer) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a non-negative token id or a list of them, "
                         f"got {eos_token_id!r}")
    return [int(i) for i in ids]


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def generate(model: nnx.Module, input_ids: Any, *, max_new_tokens: int, attention_mask: Any = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Generate up to ``max_new_tokens`` tokens after each prompt with the model's KV cache.

    Args:
        model: a loaded causal LM (``nnxport.load`` of a gpt2 or decoder conversion).
        input_ids: int token ids [B, T] (or [T]: one prompt).
        max_new_tokens: how many tokens to generate at most.
        attention_mask: [B, T], 1 for tokens, 0 for padding (left padding recommended, as for
            transformers); default all ones.
        temperature: 0 for greedy decoding; otherwise sample from ``softmax(logits / temperature)``.
        top_k: when sampling, keep only the k most likely tokens.
        top_p: when sampling, keep the smallest set of most likely tokens whose probability reaches top_p.
        seed: the sampling seed (same seed, same tokens).
        eos_token_id: token id(s) that end a row; later tokens of the row are ``pad_token_id``.
        pad_token_id: fills finished rows (default: the first eos id).

    Returns:
        int32 numpy array [B, T + n] ([T + n] for a 1-D ``input_ids``): each prompt followed by its new
        tokens, n <= max_new_tokens (fewer when every row ended with eos first).

    Raises:
        NnxportError: the model cannot generate (not a causal LM), or the sequence would run past its
            position table.
        ValueError: an argument is out of range.

    Example:
        >>> import nnxport  # doctest: +SKIP
        >>> model = nnxport.load("gpt2-nnx")  # doctest: +SKIP
        >>> nnxport.generate(model, [[464, 3290, 318]], max_new_tokens=8)  # doctest: +SKIP
    """
    if not isinstance(model, CausalLM):
        raise NnxportError(f"{type(model).__name__} cannot generate: generation needs a causal language "
                           "model with a KV cache (the gpt2 and decoder families)")
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    ids = np.asarray(input_ids)
    single = ids.ndim == 1
    ids = ids[None] if single else ids
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a non-empty int array [batch, length], got {ids.dtype} "
                         f"{list(ids.shape)}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).reshape(ids.shape)
    mask = (mask != 0).astype(np.int32)
    eos = _eos_ids(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    reencode = getattr(model, "reencode_at", None)
    if isinstance(reencode, int) and 1 <= reencode + 1 - ids.shape[1] < max_new_tokens:
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        result = _generate_reencoding(model, ids, mask, reencode + 1 - ids.shape[1], max_new_tokens, eos, pad,
                                      sampling)
        return result[0] if single else result
    positions = np.asarray(generation_positions(jnp.asarray(mask)))
    last = int(positions[:, -1].max())
    if model.max_positions is not None and last + max_new_tokens >= model.max_positions:
        raise NnxportError(f"generate: the prompt ({last + 1} positions) and "
                           f"max_new_tokens ({max_new_tokens}) run past the model's position table "
                           f"({model.max_positions} positions)")
    length = ids.shape[1]
    # Left-pad the prompt to its bucket: masked slots change neither positions nor the attention.
    extra = bucket_length(length) - length
    padded = [np.pad(a, ((0, 0), (extra, 0))) for a in (ids.astype(np.int32), mask, positions)]
    max_len = bucket_length(length + extra + max_new_tokens)
    graphdef, state = nnx.split(model)
    new, steps = _run(graphdef, state, *(jnp.asarray(a) for a in padded), jnp.int32(max_new_tokens),
                      jax.random.key(seed), jnp.asarray(eos or [-1], jnp.int32), jnp.int32(pad),
                      sampler=Sampler(float(temperature), top_k, top_p), max_len=max_len)
    result = np.concatenate([ids.astype(np.int32), np.asarray(new)[:, :int(steps)]], axis=1)
    return result[0] if single else result


def _generate_reencoding(model: nnx.Module, ids: np.ndarray, mask: np.ndarray, first: int,
                         max_new_tokens: int, eos: list[int], pad: int,
                         sampling: dict[str, Any]) -> np.ndarray:
    """:func:`generate` for a model whose ``reencode_at`` the sequence crosses (Phi-3's longrope): as
    transformers' ``Phi3ForCausalLM.prepare_inputs_for_generation`` drops the cache when the sequence
    reaches ``reencode_at + 1`` tokens, the first ``first`` tokens are generated, then the whole sequence
    is encoded anew as the prompt of the rest. Rows that ended with eos in the first part stay ended."""
    kwargs: dict[str, Any] = {**sampling, "eos_token_id": eos or None, "pad_token_id": pad}
    head = generate(model, ids, attention_mask=mask, max_new_tokens=first, **kwargs)
    ended = np.isin(head[:, ids.shape[1]:], eos).any(axis=1) if eos else np.zeros(len(ids), bool)
    if head.shape[1] < ids.shape[1] + first or ended.all():
        return head
    mask = np.concatenate([mask, np.ones((len(ids), first), np.int32)], axis=1)
    tail = generate(model, head, attention_mask=mask, max_new_tokens=max_new_tokens - first, **kwargs)
    new = tail[:, head.shape[1]:]
    new[ended] = pad
    if eos:  # stop where every row still running has ended (as one uninterrupted run would)
        hits = np.isin(new[~ended], eos)
        if hits.any(axis=1).all():
            new = new[:, :int((hits.argmax(axis=1) + 1).max())]
    return np.concatenate([head, new], axis=1)


#: Files that make a folder loadable by transformers' AutoTokenizer (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def folder_tokenizer(folder: Path, needed: bool) -> Any:
    """transformers' AutoTokenizer of a converted ``folder`` (offline: the files that travelled with the
    weights), or None when it has none and none is ``needed`` (a text prompt needs one)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        if needed:
            raise NnxportError(f"{folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)}) to encode the "
                               f"prompt; give token ids with {option('prompt_ids')}")
        return None
    import transformers

    transformers.utils.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise NnxportError(f"{folder}: the tokenizer does not load ({one_line(e, 200)}); give token ids "
                           f"with {option('prompt_ids')}") from None


def recorded_eos(config: dict[str, Any]) -> int | list[int] | None:
    """config.json's ``eos_token_id`` when it is an id or a list of ids (where generation stops)."""
    eos = config.get("eos_token_id")
    if isinstance(eos, int) or (isinstance(eos, list) and all(isinstance(e, int) for e in eos)):
        return eos
    return None
