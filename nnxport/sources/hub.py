"""Hugging Face hub ids -> a local snapshot (huggingface_hub), with its errors as one line each."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from nnxport.errors import SourceError, one_line
from nnxport.sources.pickled import PICKLE_PATTERNS

HUB_PATTERNS = ["*.safetensors", "*.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                "sentencepiece.bpe.model", "chat_template.jinja"]
"""What a hub download fetches: the weights, config / index / tokenizer / generation / preprocessor JSON,
and the tokenizer files that are not JSON (nnxport.pipeline.artifacts copies them into the output)."""

_HUB_ID = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?")
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


# ------------------------------------------------------------------------------------------------ resolving


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` looks like a hub id: ``org/name`` or ``name`` of ``[A-Za-z0-9._-]``."""
    return (
        _HUB_ID.fullmatch(spec) is not None
        and not spec.startswith(".")
        and ".." not in spec
        and not spec.endswith(".safetensors")
    )


def snapshot_download(repo_id: str, *, revision: str | None, patterns: Sequence[str] = HUB_PATTERNS) -> str:
    """``huggingface_hub.snapshot_download`` of :data:`HUB_PATTERNS` (imported on first use:
    the download machinery takes ~1 s to import).

    A commit hash already in the cache is used without asking the hub: when the hub is unreachable (and
    HF_HUB_OFFLINE unset) huggingface_hub 2.4 retries the tree listing of a commit for ~23 s before it
    falls back to the cache, whereas a branch name fails over at once."""
    from huggingface_hub import snapshot_download as download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if revision is not None and _COMMIT_HASH.fullmatch(revision):
        try:
            return download(repo_id, revision=revision, allow_patterns=list(patterns), local_files_only=True)
        except LocalEntryNotFoundError:
            pass  # not cached (or known incomplete): ask the hub
    return download(repo_id, revision=revision, allow_patterns=list(patterns))


def resolve_hub(repo_id: str, revision: str | None, allow_pickle: bool = False) -> Path:
    """Snapshot folder of ``repo_id`` at ``revision``, from the hub or the local cache; hub errors become
    one-line :class:`SourceError`\\ s."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = repo_id if revision is None else f"{repo_id}@{revision}"
    cache = constants.HF_HUB_CACHE
    try:
        if allow_pickle:
            patterns = [*HUB_PATTERNS, *PICKLE_PATTERNS]
            return Path(snapshot_download(repo_id, revision=revision, patterns=patterns))
        return Path(snapshot_download(repo_id, revision=revision))
    except GatedRepoError as e:
        raise SourceError(
            f"{repo_id} is a gated repository: accept its terms on https://huggingface.co/{repo_id} and set "
            "HF_TOKEN (or run `hf auth login`) with an account that has access"
        ) from e
    except RepositoryNotFoundError as e:
        raise SourceError(
            f"{repo_id}: no such repository on the hub (or it is private and HF_TOKEN does not grant access)"
        ) from e
    except RevisionNotFoundError as e:
        raise SourceError(f"{repo_id}: revision {revision!r} not found on the hub") from e
    except IncompleteSnapshotError as e:
        raise SourceError(
            f"{at}: the cached snapshot {e.snapshot_path} is incomplete and the hub cannot be reached — "
            "download it again with network access"
        ) from e
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            why = "the hub is offline (HF_HUB_OFFLINE=1)"
        else:
            cause = e.__cause__
            why = f"the hub cannot be reached ({one_line(cause) if cause else 'connection failed'})"
        also = "" if "/" in repo_id else f"; there is no local file or folder named {repo_id!r} either"
        raise SourceError(
            f"{at} is not in the local Hugging Face cache ({cache}) and {why} — download it once with "
            f"network access or point HF_HUB_CACHE at a cache that has it{also}"
        ) from e
    except HfHubHTTPError as e:
        raise SourceError(f"{at}: the hub answered with an error: {one_line(e)}") from e
    except httpx2.HTTPError as e:
        raise SourceError(f"{at}: cannot reach the hub ({one_line(e)})") from e
    except HFValidationError as e:
        raise SourceError(f"{repo_id}: not a valid hub id and no such file or folder ({one_line(e)})") from e
