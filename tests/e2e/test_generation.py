"""Generation with the KV cache (nnxport.generate, nnxport generate): greedy tokens equal transformers'
``generate`` for GPT-2 and every decoder model_type, left- and right-padded; cached logits equal the
full-sequence forward; sampling, eos, compile count, the CLI, and the parity report's generation check."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnxport
from nnxport import generation
from nnxport.models.layers import CACHE_BUCKET, KVCache, bucket_length, generation_positions
from nnxport.testing.replicas import build_replica, published_config

TINY: dict[str, Any] = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 300}
NO_HEAD_DIM = {k: v for k, v in TINY.items() if k != "head_dim"}
CASES: dict[str, dict[str, Any]] = {
    "gpt2": published_config("openai-community/gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=300,
                             n_positions=64),
    "llama": published_config("meta-llama/Llama-3.2-1B", **TINY),
    # layer 1 of 2 slides with a window of 3: shorter than prompt + new tokens
    "qwen2": published_config("Qwen/Qwen2.5-0.5B", **NO_HEAD_DIM, use_sliding_window=True, sliding_window=3,
                              max_window_layers=1),
    "qwen3": published_config("Qwen/Qwen3-0.6B", **{**TINY, "head_dim": 32}),
    "mistral": published_config("mistralai/Mistral-7B-v0.1", **NO_HEAD_DIM, sliding_window=3),
}
NEW = 10


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """``converted(name)``: (replica folder, its conversion without parity), built once per module."""
    root = tmp_path_factory.mktemp("generation")
    done: dict[str, tuple[Path, Path]] = {}

    def make(name: str) -> tuple[Path, Path]:
        if name not in done:
            src = build_replica(copy.deepcopy(CASES[name]), root / name, seed=3)
            nnxport.convert(src, root / f"{name}-nnx", parity=False)
            done[name] = (src, root / f"{name}-nnx")
        return done[name]

    return make


def _reference(folder: Path) -> Any:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return model


def _hf_generate(model: Any, ids: np.ndarray, mask: np.ndarray, new: int, **kwargs: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)), max_new_tokens=new,
                             do_sample=False, **kwargs)
    return out.numpy()


def _prompts(side: str) -> tuple[np.ndarray, np.ndarray]:
    """Three prompts of 9, 5 and 7 tokens, padded to 9 on ``side`` with id 0."""
    rng = np.random.default_rng(7)
    ids, mask = np.zeros((3, 9), np.int64), np.zeros((3, 9), np.int64)
    for row, n in enumerate((9, 5, 7)):
        cols = slice(9 - n, 9) if side == "left" else slice(0, n)
        ids[row, cols] = rng.integers(1, 300, size=n)
        mask[row, cols] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(CASES))
def test_greedy_equals_transformers(name: str, side: str,
                                    converted: Callable[[str], tuple[Path, Path]]) -> None:
    src, out = converted(name)
    ids, mask = _prompts(side)
    expected = _hf_generate(_reference(src), ids, mask, NEW)
    got = nnxport.generate(nnxport.load(out), ids, attention_mask=mask, max_new_tokens=NEW)
    assert got.shape == (3, 9 + NEW) and got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)
    if side == "left":  # left padding: each row generates what its unpadded prompt generates
        row = got[1, 4:]
        alone = nnxport.generate(nnxport.load(out), ids[1:2, 4:], max_new_tokens=NEW)
        np.testing.assert_array_equal(alone[0], row)


@pytest.mark.parametrize("name", ["gpt2", "mistral", "qwen2"])
def test_cached_logits_equal_full_sequence(name: str, converted: Callable[[str], tuple[Path, Path]]) -> None:
    """Prefill of 6 tokens + 6 one-token steps give the logits of the full 12-token forward pass (the
    windowed layers included: the window of 3 is shorter than the sequence)."""
    import jax.numpy as jnp

    model = nnxport.load(converted(name)[1])
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 300, size=(2, 12)), jnp.int32)
    full = np.asarray(model(ids))
    cache = model.init_cache(2, 64)
    assert isinstance(cache, KVCache) and cache.keys[0].shape[:2] == (2, 64)
    ones = jnp.ones((2, 12), jnp.int32)
    positions = generation_positions(ones)
    logits, cache = model.decode(ids[:, :6], positions[:, :6], ones[:, :6], cache)
    steps = [logits]
    for t in range(6, 12):
        logits, cache = model.decode(ids[:, t:t + 1], positions[:, t:t + 1], ones[:, t:t + 1], cache)
        steps.append(logits)
    assert int(cache.filled) == 12
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(cached, full, atol=2e-5, rtol=1e-5)
    assert np.abs(full).max() > 0.1  # the comparison is not between zeros


def test_sampling_seeded_and_top_k_1_is_greedy(converted: Callable[[str], tuple[Path, Path]]) -> None:
    model = nnxport.load(converted("llama")[1])
    ids, mask = _prompts("left")
    run = lambda **kw: nnxport.generate(model, ids, attention_mask=mask, max_new_tokens=12, **kw)  # noqa: E731
    greedy = run()
    sampled = run(temperature=1.5, seed=5)
    np.testing.assert_array_equal(sampled, run(temperature=1.5, seed=5))
    assert not np.array_equal(sampled, run(temperature=1.5, seed=6))
    assert not np.array_equal(sampled, greedy)
    np.testing.assert_array_equal(run(temperature=0.7, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(run(temperature=0.7, top_p=1e-6, seed=3), greedy)
    # unpadded prompts: every token sampled with top_k=3 is among the 3 most likely at its step, by the
    # cache-free forward pass
    import jax.numpy as jnp

    top3 = nnxport.generate(model, ids[:, 4:] + 1, max_new_tokens=12, temperature=2.0, top_k=3, seed=9)
    for step in range(5, 5 + 12):
        logits = np.asarray(model(jnp.asarray(top3[:, :step])))[:, -1]
        best = np.argsort(logits, axis=-1)[:, -3:]
        assert all(top3[r, step] in best[r] for r in range(3))


def test_eos_pads_finished_rows_and_stops_like_transformers(converted: Callable[[str], tuple[Path, Path]]
                                                             ) -> None:
    src, out = converted("gpt2")
    model, ref = nnxport.load(out), _reference(src)
    ids, mask = _prompts("left")
    greedy = nnxport.generate(model, ids, attention_mask=mask, max_new_tokens=NEW)
    eos = int(greedy[0, 9 + 2])  # row 0's third new token
    got = nnxport.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos,
                           pad_token_id=299)
    np.testing.assert_array_equal(got, _hf_generate(ref, ids, mask, NEW, eos_token_id=eos, pad_token_id=299))
    first = int(np.flatnonzero(got[0, 9:] == eos)[0])
    assert first <= 2 and (got[0, 9 + first + 1:] == 299).all()
    # one row: generation stops at eos, shorter than max_new_tokens, as transformers' does
    one = nnxport.generate(model, ids[:1], max_new_tokens=NEW, eos_token_id=[eos])
    np.testing.assert_array_equal(one, _hf_generate(ref, ids[:1], mask[:1], NEW, eos_token_id=eos))
    assert one.shape == (1, 9 + first + 1) and one[0, -1] == eos


def test_compiles_once_per_bucket(converted: Callable[[str], tuple[Path, Path]]) -> None:
    """The prefill and the step trace once for a batch and bucket, whatever the prompt length and
    max_new_tokens within it; another batch size compiles again."""
    model = nnxport.load(converted("qwen3")[1])
    rng = np.random.default_rng(0)
    before = generation.TRACES.copy()
    for length, new in ((5, 20), (11, 7), (2, 33)):
        out = nnxport.generate(model, rng.integers(1, 300, size=(5, length)), max_new_tokens=new)
        assert out.shape == (5, length + new)
    traced = generation.TRACES - before
    assert traced == {"prefill": 1, "step": 1}
    assert bucket_length(11) == CACHE_BUCKET and bucket_length(CACHE_BUCKET + 1) == 2 * CACHE_BUCKET
    nnxport.generate(model, rng.integers(1, 300, size=(4, 5)), max_new_tokens=3)
    assert generation.TRACES - before == {"prefill": 2, "step": 2}


def test_generate_refuses(converted: Callable[[str], tuple[Path, Path]], tiny_resnet_dir: Path,
                          tmp_path: Path) -> None:
    model = nnxport.load(converted("gpt2")[1])
    assert nnxport.generate(model, [[1] * 60], max_new_tokens=4).shape == (1, 64)  # n_positions is 64
    with pytest.raises(nnxport.NnxportError, match="position table"):
        nnxport.generate(model, [[1] * 61], max_new_tokens=4)
    for bad in ({"max_new_tokens": 0}, {"max_new_tokens": 2, "temperature": -1.0},
                {"max_new_tokens": 2, "top_p": 0.0}, {"max_new_tokens": 2, "top_k": 0}):
        with pytest.raises(ValueError):
            nnxport.generate(model, [[1, 2]], **bad)
    nnxport.convert(tiny_resnet_dir, tmp_path / "resnet", parity=False)
    with pytest.raises(nnxport.NnxportError, match="cannot generate"):
        nnxport.generate(nnxport.load(tmp_path / "resnet"), [[1, 2]], max_new_tokens=2)


def _write_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[EOS]"] + [f"w{i}" for i in range(298)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(folder)
    return fast


def test_cli(converted: Callable[[str], tuple[Path, Path]], tiny_resnet_dir: Path, tmp_path: Path,
             cli) -> None:
    import shutil

    folder = tmp_path / "gpt2-nnx"
    shutil.copytree(converted("gpt2")[1], folder)
    model = nnxport.load(folder)
    res = cli("generate", folder, "--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == {"tokens": nnxport.generate(model, [[5, 6, 7]], max_new_tokens=6)[0].tolist(),
                   "prompt_tokens": 3, "text": None}
    res = cli("generate", folder, "--prompt", "w1 w2", "--max-new-tokens", "3")
    assert res.exit_code == 1 and "no tokenizer" in res.stderr and "--prompt-ids" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

    tokenizer = _write_tokenizer(folder)
    res = cli("generate", folder, "--prompt", "w10 w20 w30", "--max-new-tokens", "5", "--format", "json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    expected = nnxport.generate(model, [[12, 22, 32]], max_new_tokens=5)[0].tolist()
    assert doc["tokens"] == expected and doc["prompt_tokens"] == 3
    assert doc["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert doc["text"].startswith("w10 w20 w30")
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    table = docs[docs.index("<!-- json-schema: generate -->"):].split("\n\n")[0]
    assert set(doc) == set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))  # docs/cli.md's schema
    res = cli("generate", folder, "--prompt", "w10 w20 w30", "--max-new-tokens", "5", "--temperature", "1",
              "--top-k", "5", "--top-p", "0.9", "--seed", "4")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == tokenizer.decode(
        nnxport.generate(model, [[12, 22, 32]], max_new_tokens=5, temperature=1.0, top_k=5, top_p=0.9,
                         seed=4)[0].tolist(), skip_special_tokens=True)

    res = cli("generate", folder, "--max-new-tokens", "3")
    assert res.exit_code == 2 and "exactly one of" in res.stderr
    res = cli("generate", folder, "--prompt-ids", "1,x", "--max-new-tokens", "3")
    assert res.exit_code == 2
    nnxport.convert(tiny_resnet_dir, tmp_path / "resnet", parity=False)
    res = cli("generate", tmp_path / "resnet", "--prompt-ids", "1,2", "--max-new-tokens", "3")
    assert res.exit_code == 1 and "cannot generate" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_parity_reports_generation(converted: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    src, _ = converted("mistral")
    result = nnxport.convert(src, tmp_path / "out")
    assert result.parity is not None and result.parity.passed
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["generation"] == {"new_tokens": 8, "prompt_shape": [2, 16], "agreement": 1.0,
                                    "all_match": True, "divergences": [], "passed": True}
    assert {"generate_reference", "generate_nnx"} <= set(report["timings_s"])
    assert "## Greedy generation" in (tmp_path / "out" / "parity.md").read_text()
