"""Example models for nnxport's "bring your own model" tutorial (docs/custom-models.md)."""
