"""W8A8 quantization for the AutoTP engine: `quantize=smoothquant` and `quantize=dynamic_int8`.

- `int8`: the arithmetic (per-channel weights, per-token activations, int8 x int8 -> int32 matmul).
- `int8_linear`: `Int8Linear` and the swap of HF / DeepSpeed AutoTP linear layers for it.
- `families`: the norm -> linear pairs SmoothQuant folds its factors into, per architecture family.
- `smoothing`, `calibration`, `alpha_search`, `calibration_cache`, `corpus`: SmoothQuant's steps.
- `quantizer`: the engine's hook (`quantize_loaded_model`) and `quantize_model`.
- `evaluate`: `python -m entrypoint quality`, perplexity of fp32 / naive W8A8 / dynamic_int8 / smoothquant.
"""
