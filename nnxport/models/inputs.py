"""Checking inputs before a jitted call: token ids inside the vocabulary, lengths inside the position table.

The families check both themselves: a sequence longer than a learned position table when the call is
traced (shapes are static), out-of-vocabulary ids in eager calls, where the ids have values. Under ``jit``
the ids are tracers and an embedding lookup clamps (or returns NaN for) an id out of range instead of
raising, as transformers does; :func:`check_inputs` is the check to run on the host first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from nnxport.models.layers import check_length, check_token_ids


def _tables(model: nnx.Module) -> tuple[int, tuple[int, str] | None]:
    """(vocab size, (position table rows, config field) or None) of a built-in text model."""
    from nnxport.models.bert import Bert
    from nnxport.models.decoder import Decoder
    from nnxport.models.gpt2 import GPT2

    if isinstance(model, GPT2):
        return model.wte.num_embeddings, (model.wpe.num_embeddings, "n_positions")
    if isinstance(model, Bert):
        emb = model.embeddings
        return emb.word.num_embeddings, (emb.position.num_embeddings, "max_position_embeddings")
    if isinstance(model, Decoder):
        return model.spec.vocab_size, None  # rotary positions: no table
    raise TypeError(f"check_inputs: {type(model).__name__} is not one of nnxport's text models "
                    "(Bert, GPT2, Decoder)")


def check_inputs(model: nnx.Module, input_ids: Any) -> None:
    """Raise a ValueError if ``model`` cannot take ``input_ids`` [batch, length]: an id outside
    ``[0, vocab_size)`` (the message names the first one, its position and the vocabulary size), or a
    length beyond a learned position table (GPT-2 ``n_positions``, BERT ``max_position_embeddings``).

    Call it on concrete ids before a jitted call, where the model itself cannot look at the values.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> import nnxport
        >>> from nnxport.models.gpt2 import GPT2, resolve
        >>> model = GPT2(resolve({"n_embd": 32, "n_head": 4, "n_layer": 1, "vocab_size": 100,
        ...                        "n_positions": 16}), rngs=nnx.Rngs(0))
        >>> nnxport.check_inputs(model, np.array([[1, 2, 100]]))
        Traceback (most recent call last):
        ...
        ValueError: input_ids[0, 2] is 100, outside the vocabulary [0, 100) (vocab_size 100)
    """
    vocab, positions = _tables(model)
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {list(ids.shape)}")
    if positions is not None:
        check_length(ids.shape[1], *positions)
    check_token_ids(ids, vocab)
