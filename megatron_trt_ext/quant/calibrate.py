"""Calibration on a replica of the live model, with ModelOpt, leaving training state untouched.

ModelOpt's ``mtq.quantize`` inserts quantizers into the modules it calibrates and, for SmoothQuant
and AWQ, rescales their weights. So it runs on a replica: a deep copy of the rank's model chunks
that shares only the process groups, made at the save, calibrated in eval mode under no_grad,
read, and dropped. The live model's parameters, gradients, module structure and training mode are
never touched; the RNG states (CPU, CUDA, Megatron's tracker) are saved and restored around it.
The replica needs room for one more copy of the rank's weights while it lives.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError, ExportError
from ..forward import is_staged, pipeline_loop, preserved_rng, single_stage_loop  # noqa: F401  (shared)

# Megatron linears whose inputs ModelOpt calibrates (names after the plan's expansion).
LINEAR_SUFFIXES = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                   "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")


UNQUANTIZED = ("*output_layer*", "*router*")


def is_quantizable_linear(unit_name: str) -> bool:
    return unit_name.endswith(LINEAR_SUFFIXES) and ".layers." in unit_name


def _process_groups(chunks) -> dict:
    """Every ProcessGroup reachable from module attributes (shared, never copied)."""
    import torch.distributed as dist

    memo: dict = {}

    def visit(obj, depth):
        if isinstance(obj, dist.ProcessGroup):
            memo[id(obj)] = obj
            return
        if depth > 3 or isinstance(obj, (torch.Tensor, torch.nn.Module, str, bytes, int, float)):
            return
        values = obj if isinstance(obj, (list, tuple)) else getattr(obj, "__dict__", {}).values()
        for value in values:
            visit(value, depth + 1)

    for chunk in chunks:
        for module in chunk.modules():
            for value in vars(module).values():
                visit(value, 0)
    return memo


def replicate(chunks: list) -> list:
    """Deep copies of the model chunks that share the live model's process groups."""
    return copy.deepcopy(chunks, _process_groups(chunks))


def calibration_batches(options, data: Any, vocab_size: int, device) -> list:
    """Token batches [batch, seq] for calibration, from the configured source."""
    n, seq, bs = options.num_samples, options.seq_len, options.batch_size
    if options.source == "synthetic":
        gen = torch.Generator().manual_seed(options.seed)  # never the global RNG
        tokens = torch.randint(0, vocab_size, (n, seq), generator=gen)
    elif options.source == "iterator":
        if data is None:
            raise ConfigError("quantization.calibration.source is 'iterator' but no calibration_data= was "
                              "given to attach()/Exporter(); pass an iterator or a callable returning one")
        source = data() if callable(data) else data
        rows = []
        for item in source:
            t = item["tokens"] if isinstance(item, dict) else item
            t = torch.as_tensor(t)
            rows.extend(t.reshape(-1, t.shape[-1])[:, :seq])
            if len(rows) >= n:
                break
        if not rows:
            raise ExportError("calibration_data yielded no token batches")
        tokens = torch.stack(rows[:n])
    else:
        import json

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(options.tokenizer)
        rows = []
        with open(options.jsonl) as f:
            for line in f:
                ids = tok(json.loads(line)["text"])["input_ids"][:seq]
                if len(ids) == seq:
                    rows.append(torch.tensor(ids))
                if len(rows) >= n:
                    break
        if not rows:
            raise ExportError(f"{options.jsonl}: no line with at least {seq} tokens")
        tokens = torch.stack(rows)
    return [tokens[i:i + bs].to(device) for i in range(0, len(tokens), bs)]


def target_layer(info, layer_number: int) -> int:
    """The exported layer a source layer (Megatron's 1-based global layer_number) belongs to."""
    index = layer_number - 1
    return index // 2 if info.source_layout == "hybrid_paired" else index


def _kv_hooks(replica: list, info, kv_amax: dict) -> list:
    """Record max |k| and |v| per layer where the KV cache holds them: at the core attention's
    input, K after RoPE (and after the k-norm), as ModelOpt's Megatron KV quantizers measure."""
    handles = []
    for chunk in replica:
        for layer in chunk.decoder.layers:
            core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
            if core is None:
                continue
            index = target_layer(info, layer.layer_number)

            def hook(module, args, kwargs, index=index):
                key = args[1] if len(args) > 1 else kwargs["key"]
                value = args[2] if len(args) > 2 else kwargs["value"]
                k, v = key.detach().abs().amax().float().cpu(), value.detach().abs().amax().float().cpu()
                old = kv_amax.get(index, (torch.tensor(0.0), torch.tensor(0.0)))
                kv_amax[index] = (torch.maximum(old[0], k), torch.maximum(old[1], v))
            handles.append(core.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def calibrate(chunks: list, spec, info, data: Any = None, forward_loop: Optional[Callable] = None,
              comm=None, batches: Optional[list] = None) -> tuple:
    """Calibrate a replica; returns (replica chunks, {layer: (k_amax, v_amax)}).

    Call on every rank (ModelOpt synchronizes amax over TP/DP/EP; KV amax is max-reduced here).
    ``batches``: the calibration batches when the caller already drew them (the verification
    probe shares them, so an iterator source is read once per export).
    """
    import modelopt.torch.quantization as mtq

    device = next(p.device for c in chunks for p in c.parameters())
    with preserved_rng():
        replica = replicate(chunks)
        for chunk in replica:
            chunk.eval()
        if batches is None:
            batches = calibration_batches(spec.calibration, data, info.padded_vocab_size, device)
        kv_amax: dict = {}
        handles = _kv_hooks(replica, info, kv_amax) if spec.kv_cache != "none" else []
        staged = is_staged(replica)
        if forward_loop is not None:
            loop = forward_loop
        elif staged:
            loop = pipeline_loop(batches)
        else:
            loop = single_stage_loop(batches)
        try:
            if spec.algo is not None:
                cfg = copy.deepcopy(getattr(mtq, spec.algo.modelopt_cfg))
                # What the export leaves unquantized must not be fake-quantized (or smoothed) while
                # calibrating: ModelOpt's own exclusions use HF names (lm_head), not Megatron's.
                for pattern in UNQUANTIZED:
                    if isinstance(cfg["quant_cfg"], list):  # ModelOpt >= 0.45: ordered entries
                        cfg["quant_cfg"].append({"quantizer_name": pattern, "enable": False})
                    else:
                        cfg["quant_cfg"][pattern] = {"enable": False}
                if spec.algorithm == "int8_sq":
                    cfg["algorithm"] = {"method": "smoothquant", "alpha": spec.smoothquant_alpha}
                if staged:  # one quantize over all chunks: the loop drives them together
                    replica = list(mtq.quantize(torch.nn.ModuleList(replica), cfg, loop))
                else:
                    replica = [mtq.quantize(chunk, cfg, loop) for chunk in replica]
            elif staged:
                loop(torch.nn.ModuleList(replica))
            else:
                for chunk in replica:
                    loop(chunk)
        finally:
            for h in handles:
                h.remove()
    if spec.kv_cache != "none":
        kv_amax = _reduce_kv(kv_amax, info.num_layers, comm)
    return replica, kv_amax


def _reduce_kv(kv_amax: dict, num_layers: int, comm) -> dict:
    stacked = torch.zeros(num_layers, 2)
    for layer, (k, v) in kv_amax.items():
        stacked[layer, 0], stacked[layer, 1] = k, v
    if comm is not None and comm.distributed:
        torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.MAX, group=comm.control)
    return {layer: (stacked[layer, 0], stacked[layer, 1]) for layer in range(num_layers)}
