"""Quantize a loaded model in place: `quantize=smoothquant` or `quantize=dynamic_int8`.

    dynamic_int8: every linear layer (except the output head) -> Int8Linear (per-channel int8 weights,
                  per-token dynamic int8 activations); no smoothing.
    smoothquant:  calibrate (or reuse a saved calibration), choose alpha unless smoothquant_alpha is set,
                  fold the smoothing factors into the norms (quantization.families), then as dynamic_int8.

`quantize_loaded_model` is the engine's hook (handlers/autotp_engine.load_autotp_model calls it right
after the model is built and AutoTP has sharded it); `quantize_model` is the same with explicit settings
(`python -m entrypoint quality` uses it). `smooth_model` is the smoothing alone, for an engine whose own
int8 layers quantize the smoothed weights (FastGen's, handlers/fastgen_int8.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from quantization.families import family_for, supported_model_types

logger = logging.getLogger(__name__)

SMOOTHQUANT = "smoothquant"
DYNAMIC_INT8 = "dynamic_int8"
METHODS = (SMOOTHQUANT, DYNAMIC_INT8)


@dataclass
class QuantizationResult:
    method: str
    summary: str
    linears: int
    int8_bytes: int
    fp16_bytes: int
    alpha: float | None = None
    alpha_source: str | None = None  # "smoothquant_alpha" or "search"
    alpha_errors: dict[float, float] = field(default_factory=dict)
    calibration: str | None = None  # "calibrated (N tokens, S s)" or "reused <file>"
    calibration_file: str | None = None

    @property
    def ratio(self) -> float:
        """Bytes of the int8 weights and their scales over the same weights' bytes in fp16."""
        return self.int8_bytes / self.fp16_bytes if self.fp16_bytes else 0.0


def quantize_loaded_model(module: Any, properties: Any, plan: Any, model_path: str, tokenizer: Any,
                          progress: Callable[[str], None]) -> QuantizationResult | None:
    """The AutoTP engine's hook: quantize as the plan says (nothing when quantize is unset)."""
    if getattr(plan, "quantize", None) is None:
        return None
    return quantize_model(module, plan.quantize, tokenizer=tokenizer, model_path=model_path,
                          alpha=properties.smoothquant_alpha,
                          calibration_data=properties.smoothquant_calibration_data,
                          cache_dir=calibration_cache_dir(properties.model_cache_dir), progress=progress)


def calibration_cache_dir(model_cache_dir: str | None) -> Path:
    """Where SmoothQuant's calibrations are saved: under model_cache_dir when it is set, else the default."""
    from quantization.calibration_cache import default_cache_dir
    return Path(model_cache_dir) if model_cache_dir else default_cache_dir()


def quantize_model(module: Any, method: str, *, tokenizer: Any = None, model_path: str | None = None,
                   alpha: float | None = None, calibration_data: str | None = None, cache_dir: Path | None = None,
                   progress: Callable[[str], None] = lambda message: None, per_tensor: bool = False,
                   show_progress: bool | None = None) -> QuantizationResult:
    """`cache_dir` None: calibrate without saving or reusing. `per_tensor`: the naive W8A8 baseline."""
    from quantization.int8_linear import linear_names, replace_linears

    if method not in METHODS:
        raise ValueError(f"quantize={method}: allowed values are {', '.join(METHODS)}")
    result = QuantizationResult(method, "", 0, 0, 0)
    if method == SMOOTHQUANT:
        _smooth(module, result, tokenizer=tokenizer, model_path=model_path, alpha=alpha,
                calibration_data=calibration_data, cache_dir=cache_dir, progress=progress,
                show_progress=_is_rank_zero() if show_progress is None else show_progress)
    progress(f"quantize={method}: replacing linear layers with int8 ones")
    report = replace_linears(module, linear_names(module), per_tensor=per_tensor)
    if not report.replaced:
        raise RuntimeError(f"quantize={method}: the model has no linear layer this package can quantize "
                           f"(types seen: {', '.join(sorted(report.skipped.values())) or 'none'})")
    result.summary = report.summary()
    result.linears, result.int8_bytes, result.fp16_bytes = len(report.replaced), report.int8_bytes, report.fp16_bytes
    progress(f"quantize={method}: {result.summary}")
    logger.info("quantize=%s: %s", method, result.summary)
    return result


def smooth_model(module: Any, *, tokenizer: Any, model_path: str | None, alpha: float | None = None,
                 calibration_data: str | None = None, cache_dir: Path | None = None,
                 progress: Callable[[str], None] = lambda message: None) -> tuple[QuantizationResult, list[str]]:
    """SmoothQuant's smoothing of a loaded float model, without replacing its linear layers: calibrate (or reuse a
    saved calibration), choose alpha unless given, fold the factors. Returns the result (no int8 bytes yet) and
    the names of the parameters the folding changed (norms and the linear layers they feed)."""
    result = QuantizationResult(SMOOTHQUANT, "", 0, 0, 0)
    groups = _smooth(module, result, tokenizer=tokenizer, model_path=model_path, alpha=alpha,
                     calibration_data=calibration_data, cache_dir=cache_dir, progress=progress,
                     show_progress=_is_rank_zero())
    names = {id(m): name for name, m in module.named_modules()}
    changed = []
    for group in groups:
        for part in (group.norm, *group.linears):
            changed += [f"{names[id(part)]}.{p}" for p, _ in part.named_parameters(recurse=False)]
    return result, sorted(set(changed))


def _smooth(module: Any, result: QuantizationResult, *, tokenizer: Any, model_path: str | None, alpha: float | None,
            calibration_data: str | None, cache_dir: Path | None, progress: Callable[[str], None],
            show_progress: bool) -> list[Any]:
    from quantization import calibration_cache as cache
    from quantization.alpha_search import search_alpha
    from quantization.calibration import WINDOW_TOKENS, WINDOWS, calibrate
    from quantization.corpus import calibration_texts, token_windows
    from quantization.smoothing import bind_groups, smooth

    config = module.config.to_dict()
    model_type = getattr(module.config, "model_type", None) or config.get("model_type")
    family = family_for(model_type)
    if family is None:
        raise ValueError(f"quantize=smoothquant: model_type {model_type} has no norm -> linear map; supported: "
                         f"{', '.join(supported_model_types())} (or use quantize=dynamic_int8)")
    refusal = family.refuse(config)
    if refusal:
        raise ValueError(f"quantize=smoothquant: {refusal}; use quantize=dynamic_int8")
    groups = bind_groups(module, family, config)
    if _world_size() > 1:
        # quantization/families.py: a linear source's channels are sharded across ranks here
        groups = [group for group in groups if not group.source_is_linear]

    file = None
    if cache_dir is not None and model_path is not None:
        settings = {"model": cache.model_fingerprint(model_path), "dtype": str(next(module.parameters()).dtype),
                    "calibration": cache.calibration_source_fingerprint(calibration_data),
                    "windows": WINDOWS, "window_tokens": WINDOW_TOKENS, "alpha": alpha,
                    # under tensor parallelism some groups are left out (see above), so the record differs
                    "groups": [group.key for group in groups]}
        file = cache.cache_file(cache_dir, cache.cache_key(settings))
    # Every tensor-parallel rank must make the same choice (a calibration is forward passes in lockstep),
    # so rank 0 looks and tells the others.
    record = _from_rank_zero(lambda: cache.load(file) if file is not None else None)
    if record is not None:
        act_absmax, chosen, source = record["act_absmax"], record["alpha"], record["alpha_source"]
        result.alpha_errors = dict(record.get("alpha_errors", {}))
        result.calibration = f"reused {file}"
        progress(f"SmoothQuant: reusing the calibration saved in {file}")
    else:
        texts, description = calibration_texts(calibration_data)
        windows = token_windows(tokenizer, texts, WINDOWS, WINDOW_TOKENS)
        progress(f"SmoothQuant: calibrating on {windows.shape[0]} windows of {windows.shape[1]} tokens of {description}")
        started = time.monotonic()
        calibrated = calibrate(module, groups, windows, show_progress=show_progress)
        act_absmax = calibrated.act_absmax
        if alpha is None:
            chosen, result.alpha_errors = search_alpha(groups, act_absmax, calibrated.samples)
            chosen = _from_rank_zero(lambda: chosen)
            source = "search"
        else:
            chosen, source = alpha, "smoothquant_alpha"
        seconds = time.monotonic() - started
        result.calibration = f"calibrated on {calibrated.tokens} tokens of {description} in {seconds:.1f} s"
        if file is not None and _is_rank_zero():
            cache.save(file, {"act_absmax": act_absmax, "alpha": chosen, "alpha_source": source,
                              "alpha_errors": result.alpha_errors, "calibration": description})
            result.calibration += f", saved to {file}"
    result.alpha, result.alpha_source, result.calibration_file = chosen, source, str(file) if file else None
    if source == "search":
        errors = ", ".join(f"{a:g}: {e:.3g}" for a, e in sorted(result.alpha_errors.items()))
        message = f"SmoothQuant: alpha={chosen:g} chosen by search (mean relative W8A8 output error per alpha: {errors})"
    else:
        message = f"SmoothQuant: alpha={chosen:g} from smoothquant_alpha"
    logger.info("%s; %s", message, result.calibration)
    progress(message)
    smooth(groups, act_absmax, chosen)
    return groups


def _world_size() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _is_rank_zero() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _from_rank_zero(produce: Callable[[], Any]) -> Any:
    """`produce()` on rank 0, the same object on every rank (alone: just `produce()`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return produce()
    box = [produce() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
