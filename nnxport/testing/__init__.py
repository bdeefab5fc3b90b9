"""Test and demo helpers, kept out of the families and the pipeline.

- :mod:`nnxport.testing.published`: the published configs each family is tested on (hub id -> config.json
  fields), ``published_config(repo_id, **overrides)``.
- :mod:`nnxport.testing.replicas`: random-weight replicas of them built offline with transformers
  (``build_replica``, ``edit_safetensors``; ``python -m nnxport.testing.replicas REPO_ID --hub-cache DIR``).

Nothing is imported here, so that ``python -m nnxport.testing.replicas`` runs its module fresh.
"""
