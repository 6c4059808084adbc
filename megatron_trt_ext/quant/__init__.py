"""Quantized export. Only `quant.calibrate` and `quant.numerics` import ModelOpt (lazily)."""
