"""Quantized checkpoints, dequantized while streaming: fp8 with block scales, mxfp4.

- :mod:`~nnxport.quant.scheme`: config.json ``quantization_config`` -> :class:`~nnxport.quant.scheme.Scheme`
  (or a one-line refusal naming the method or field).
- :mod:`~nnxport.quant.dequant`: the arithmetic (numpy; as transformers 5.24 does it on CPU, bit for bit).
- :mod:`~nnxport.quant.view`: a source whose tensors are the dequantized ones, read part by part.
- :mod:`~nnxport.quant.reference`: the dequantized weights for the parity reference, by transformers' code.
"""
