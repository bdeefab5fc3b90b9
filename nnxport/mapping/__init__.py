"""Mappings as data: YAML text -> rules (:mod:`~nnxport.mapping.schema`) -> an analysis against a source and a
model (:mod:`~nnxport.mapping.analysis`), the ops rules apply (:mod:`~nnxport.mapping.ops`), and drafts of
new mappings (:mod:`~nnxport.mapping.draft`). Pure: shapes only, no tensor data, no jax.
"""
