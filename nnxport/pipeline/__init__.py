"""The conversion pipeline, one module per step: resolve -> plan -> transfer -> output (parity: its own room).

- :mod:`~nnxport.pipeline.resolve`: what the user names (hub id, folder, file, ``config``) -> an open Source.
- :mod:`~nnxport.pipeline.plan`: source + mapping + family -> a :class:`~nnxport.pipeline.plan.Plan`, the one
  place the plan is built (abstract model, checked assignments, placement, whether parity runs).
- :mod:`~nnxport.pipeline.transfer`: the streaming loop, each target read -> ops -> cast -> placed.
- :mod:`~nnxport.pipeline.output`: the staged output folder and the Orbax writer/reader.
- :mod:`~nnxport.pipeline.manifest`: nnxport.json, built at conversion and validated when read back.
"""
