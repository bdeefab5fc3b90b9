"""Parity: the transformers reference and the NNX model on the same seeded inputs.

- :mod:`~nnxport.parity.run`: builds the reference, runs both sides, compares outputs and layers.
- :mod:`~nnxport.parity.metrics`: the one comparison used for outputs and per-layer activations.
- :mod:`~nnxport.parity.layerwise`: per-layer capture and pairing through the mapping, the first jump.
- :mod:`~nnxport.parity.report`: parity.json and parity.md.
"""
