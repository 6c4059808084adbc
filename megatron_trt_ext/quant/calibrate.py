"""Calibration statistics, gathered while training waits, leaving training state untouched.

Two ways, chosen by the recipe (`QuantSpec.calibration_kind`):

* ``max`` (fp8, nvfp4 and the KV-cache scales): ModelOpt's max calibration measures, per
  quantized linear, max |input| over every calibration token (with quantization switched off
  while it collects), then takes the MAX over data- and tensor-parallel ranks; for the KV cache,
  max |K| (after RoPE) and max |V| at the core attention. Forward pre-hooks on the *live* model
  measure exactly that, with no copy of the weights and no quantizer inserted: eval mode, no_grad,
  RNG states restored, hooks removed (`forward.run_forward`); the values are MAX-reduced by name
  over every rank.
* ``smoothquant`` / ``awq``: ModelOpt's own algorithms, which search per-channel scales and
  rescale weights, run on a replica: a deep copy of the rank's chunks that shares only the
  process groups, calibrated and read, then dropped. It needs room for one more copy of the
  rank's weights while it lives.

Weight-only formats without a KV-cache scale (fp8_pb_wo, fp8_pc_pt, mxfp8, w4a16_nvfp4) need no
forward pass at all: their scales come from the weights.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError, ExportError
from ..forward import eval_mode, is_staged, pipeline_loop, preserved_rng, single_stage_loop

# Megatron linears whose inputs ModelOpt calibrates (names after the plan's expansion): attention
# (fused QKV, or multi-latent attention's projections), the MLP, each expert and the shared
# experts. Routers, embeddings, the output layer and the MTP modules' own projection stay unquantized.
LINEAR_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "linear_q_proj", "linear_q_down_proj",
                  "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")
_LINEAR = re.compile(r"\.layers\.\d+\.(self_attention|mlp|mlp\.shared_experts|mlp\.experts\.experts\.\d+)\."
                     r"(" + "|".join(LINEAR_MODULES) + r")\.weight$")
_EXPERT = re.compile(r"\.experts\.experts\.\d+\.")
# A Mamba-2 mixer's projections (Nemotron-H): out_proj, and in_proj, which Megatron's sharded state
# dict holds as its components (z, x, B, C, dt) and the HF export concatenates (`is_linear_part`).
# Its conv1d and SSM parameters stay unquantized, as ModelOpt leaves them.
_MIXER = re.compile(r"\.layers\.\d+\.mixer\.(out_proj\.weight|in_proj\.weight\.(z|x|B|C|dt))$")

UNQUANTIZED = ("*output_layer*", "*router*")


def is_quantizable_linear(unit_name: str) -> bool:
    return _LINEAR.search(unit_name) is not None or _MIXER.search(unit_name) is not None


def is_linear_part(unit_name: str) -> bool:
    """A component of one linear that the HF export concatenates (a Mamba mixer's in_proj): its
    scales come from the whole concatenated weight, and the statistics belong to the whole linear
    (`linear_of`)."""
    return _MIXER.search(unit_name) is not None and not unit_name.endswith(".weight")


def linear_of(unit_name: str) -> str:
    """The weight name of the linear a unit belongs to: the unit itself, or, for a component
    (`is_linear_part`), the whole linear's (``...mixer.in_proj.weight``), which names its statistics."""
    return unit_name.rsplit(".", 1)[0] if is_linear_part(unit_name) else unit_name


def sharing_key(unit_name: str) -> str:
    """Linears whose input amax is one value: the experts of one layer share theirs (ModelOpt
    syncs it over the local experts, then the expert-parallel ranks)."""
    return _EXPERT.sub(".experts.experts.*.", unit_name)


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


def check_calibration_data(data: Any) -> None:
    """``calibration_data`` must give every export the same batches afresh: a callable returning
    an iterable (called once per export), or a collection that iterates anew each time (a list,
    a tensor, a DataLoader). A one-shot iterator or generator is refused: the first export would
    use it up (taking batches from training, when it is the training iterator) and a later one
    would find it empty."""
    if data is None or callable(data):
        return
    try:
        one_shot = iter(data) is data
    except TypeError:
        raise ConfigError(f"calibration_data: a {type(data).__name__} is neither iterable nor callable; pass a "
                          "callable returning an iterator of token batches, e.g. calibration_data=lambda: "
                          "iter(batches)") from None
    if one_shot:
        raise ConfigError(f"calibration_data: a one-shot {type(data).__name__} would be used up by the first "
                          "export (taking batches from training if it is the training iterator) and leave later "
                          "exports nothing; pass a callable that returns a fresh iterator, e.g. "
                          "calibration_data=lambda: iter(batches), or a list of batches")


def calibration_batches(options, data: Any, vocab_size: int, device) -> list:
    """Token batches [batch, seq] for calibration, from the configured source. ``vocab_size``: the
    exported vocabulary (synthetic ids never fall on the padding rows the export trims, which no
    tokenizer produces and whose embeddings training never updates)."""
    n, seq, bs = options.num_samples, options.seq_len, options.batch_size
    if options.source == "synthetic":
        gen = torch.Generator().manual_seed(options.seed)  # never the global RNG
        tokens = torch.randint(0, vocab_size, (n, seq), generator=gen)
    elif options.source == "iterator":
        if data is None:
            raise ConfigError("quantization.calibration.source is 'iterator' but no calibration_data= was "
                              "given to attach()/Exporter(); pass a callable returning an iterator, or a list of batches")
        check_calibration_data(data)
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


def _kv_hooks(chunks: list, info, kv_amax: dict) -> list:
    """Record max |k| and |v| per layer where the KV cache holds them: at the core attention's
    input, K after RoPE (and after the k-norm), as ModelOpt's Megatron KV quantizers measure."""
    handles = []
    for chunk in chunks:
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


@dataclass
class Calibration:
    """What calibration measured: ``replica`` (ModelOpt-calibrated chunks, smoothquant/awq: their
    quantizers hold the statistics and their weights are the ones to export), ``input_amax``
    (max path: canonical linear weight name -> max |input|), ``kv_amax`` (layer -> (k, v))."""

    replica: Optional[list] = None
    input_amax: dict = field(default_factory=dict)
    kv_amax: dict = field(default_factory=dict)
    # group key (`group_key`) -> max |weight| over the linears of a shared-input group
    group_amax: dict = field(default_factory=dict)


def group_key(unit_name: str, groups: tuple) -> Optional[str]:
    """The shared-input group (`ArchSpec.shared_input_linears`) a linear belongs to."""
    for index, members in enumerate(groups):
        for member in members:
            if unit_name.endswith("." + member) and ".layers." in unit_name:
                return f"{unit_name[: -len(member)]}#group{index}"
    return None


def _group_amax(local: dict, groups: tuple, comm) -> dict:
    """max |weight| per shared-input group, over every rank's slices (weights of the live model)."""
    mine: dict = {}
    for name, pieces in local.items():
        key = group_key(name, groups)
        if key is None:
            continue
        for piece in pieces:
            t = piece.tensor
            if t.dtype == torch.uint8:  # FP8-trained: dequantized by its own statistic, which it carries
                continue
            mine[key] = max(mine.get(key, 0.0), float(t.detach().abs().amax()))
    return _max_over_ranks(mine, comm)


def _max_over_ranks(mine: dict, comm) -> dict:
    """{name: float} -> {name: float32 scalar}, the MAX of every rank's value for each name (ranks
    of different pipeline stages name different linears; floats hold float32 values exactly)."""
    if comm is not None and comm.distributed:
        merged: dict = {}
        for theirs in comm.all_gather_object(mine):
            for name, value in theirs.items():
                merged[name] = max(merged.get(name, value), value)
        mine = merged
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in mine.items()}


def calibrate(chunks: list, spec, info, local: dict, data: Any = None, forward_loop: Optional[Callable] = None,
              comm=None, batches: Optional[list] = None, groups: tuple = (),
              vocab_size: Optional[int] = None) -> Calibration:
    """Gather the statistics ``spec`` needs. Call on every rank (the values are MAX-reduced).

    ``local``: the live chunks' slices (`plan.local_shards`), which name the hooked linears.
    ``batches``: the calibration batches when the caller already drew them (the verification
    probe shares them, so an iterator source is read once per export); else they are drawn here,
    from ``vocab_size`` ids (the exported vocabulary).
    """
    kind = spec.calibration_kind
    group_amax = _group_amax(local, groups, comm) if groups else {}
    if kind is None:
        return Calibration(group_amax=group_amax)
    device = next(p.device for c in chunks for p in c.parameters())
    if batches is None and forward_loop is None:
        if vocab_size is None:
            raise ValueError("calibrate: pass the calibration batches, a forward_loop, or vocab_size (the exported "
                             "vocabulary, which synthetic ids are drawn from)")
        batches = calibration_batches(spec.calibration, data, vocab_size, device)
    if kind in ("smoothquant", "awq"):
        replica, kv_amax = _calibrate_replica(chunks, spec, info, batches, forward_loop)
        result = Calibration(replica=replica, kv_amax=kv_amax)
    else:
        result = _calibrate_live(chunks, spec, info, local, batches, forward_loop, comm)
    if spec.kv_cache != "none":
        result.kv_amax = _reduce_kv(result.kv_amax, info.num_layers, comm)
    result.group_amax = group_amax
    return result


def _loop(chunks: list, batches, forward_loop):
    if forward_loop is not None:
        return forward_loop
    return pipeline_loop(batches) if is_staged(chunks) else single_stage_loop(batches)


def _drive(chunks: list, loop) -> None:
    if is_staged(chunks):  # the loop drives every chunk through the pipeline schedule together
        loop(torch.nn.ModuleList(chunks))
    else:
        for chunk in chunks:
            loop(chunk)


def _calibrate_live(chunks, spec, info, local, batches, forward_loop, comm) -> Calibration:
    owners = {}
    for chunk in chunks:
        for module in chunk.modules():
            weight = module.__dict__.get("_parameters", {}).get("weight")
            if weight is None:
                continue
            # the weight, and the raw bytes of an FP8 weight (its pieces when exported natively)
            for tensor in (weight, getattr(weight, "_data", None), getattr(weight, "_rowwise_data", None)):
                try:
                    owners[tensor.untyped_storage().data_ptr()] = module
                except (AttributeError, RuntimeError, NotImplementedError):
                    pass
    linears = {}  # module -> canonical weight name
    if any(a.activation is not None for a in spec.algorithms):
        for name, pieces in local.items():
            if is_quantizable_linear(name):
                module = owners.get(pieces[0].tensor.untyped_storage().data_ptr())
                if module is not None:
                    linears[module] = linear_of(name)
    amax: dict = {}
    kv_amax: dict = {}
    handles = []
    for module, name in linears.items():
        def hook(mod, args, name=sharing_key(name)):
            x = linear_input(mod, args[0]).detach()
            if x.numel() == 0:  # an expert that got no tokens in this batch
                return
            value = x.abs().amax().float()
            amax[name] = torch.maximum(amax[name], value) if name in amax else value
        handles.append(module.register_forward_pre_hook(hook))
    if spec.kv_cache != "none":
        handles += _kv_hooks(chunks, info, kv_amax)
    try:
        with preserved_rng(), eval_mode(chunks), torch.no_grad():
            _drive(chunks, _loop(chunks, batches, forward_loop))
    finally:
        for h in handles:
            h.remove()
    return Calibration(input_amax=_max_over_ranks({n: float(v) for n, v in amax.items()}, comm), kv_amax=kv_amax)


def linear_input(module, x: torch.Tensor) -> torch.Tensor:
    """What a linear's GEMM multiplies: its input, or, for Transformer Engine's fused
    LayerNorm-linear (``layer_norm_weight``), the normalized input (what ModelOpt quantizes)."""
    gamma = getattr(module, "layer_norm_weight", None)
    if gamma is None:
        return x
    eps = float(getattr(module, "eps", 1e-5))
    gamma = gamma.float() + (1.0 if getattr(module, "zero_centered_gamma", False) else 0.0)
    x = x.float()
    if str(getattr(module, "normalization", "LayerNorm")) == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma
    beta = getattr(module, "layer_norm_bias", None)
    out = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps) * gamma
    return out + beta.float() if beta is not None else out


def _calibrate_replica(chunks, spec, info, batches, forward_loop) -> tuple:
    import modelopt.torch.quantization as mtq

    with preserved_rng():
        replica = replicate(chunks)
        for chunk in replica:
            chunk.eval()
        kv_amax: dict = {}
        handles = _kv_hooks(replica, info, kv_amax) if spec.kv_cache != "none" else []
        loop = _loop(replica, batches, forward_loop)
        try:
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
            if is_staged(replica):  # one quantize over all chunks: the loop drives them together
                replica = list(mtq.quantize(torch.nn.ModuleList(replica), cfg, loop))
            else:
                replica = [mtq.quantize(chunk, cfg, loop) for chunk in replica]
        finally:
            for h in handles:
                h.remove()
    return replica, kv_amax


def _reduce_kv(kv_amax: dict, num_layers: int, comm) -> dict:
    stacked = torch.zeros(num_layers, 2)
    for layer, (k, v) in kv_amax.items():
        stacked[layer, 0], stacked[layer, 1] = k, v
    if comm is not None and comm.distributed:
        torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.MAX, group=comm.control)
    return {layer: (stacked[layer, 0], stacked[layer, 1]) for layer in range(num_layers)}
