"""Checkpoint sources: what a hub id, a folder or a single file holds, read lazily and never trusted.

- :mod:`~nnxport.sources.folder`: :func:`~nnxport.sources.folder.open_source`, folders, indexes, single files.
- :mod:`~nnxport.sources.hub`: hub ids -> a local snapshot (huggingface_hub), its errors as one line each.
- :mod:`~nnxport.sources.base`: :class:`~nnxport.sources.base.Source`, its files and its reads.
- :mod:`~nnxport.sources.safetensors`: safetensors headers, validated; the dtypes they may hold.
- :mod:`~nnxport.sources.pickled`: pickle weights, only with ``allow_pickle`` and ``weights_only=True``.
- :mod:`~nnxport.sources.files`: regular files only, inside the source's folder; strict JSON.
"""
