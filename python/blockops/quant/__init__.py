"""Quantization pipelines that drive blockops' quantized layers end to end on real models (EfficientQAT's
Block-AP and E2E-QP, round-to-nearest; `blockops.quant.pipeline` holds the method registry and the CLI's
quantize / eval entry points)."""
