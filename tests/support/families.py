"""Tiny models of the newer families, for tests and GPU checks ONLY, with the stand-ins they need on
a machine without Transformer Engine.

* `ZeroCenteredNorm`: LayerNorm/RMSNorm with zero-centred gamma (stores ``w``, applies ``1 + w``),
  what Transformer Engine's norms do with ``layernorm_zero_centered_gamma``; Megatron has no
  plain-torch module for it. Same parameter names as Megatron's wrapped torch norms.
* HybridModel's final norm is hard-wired to Transformer Engine (``hybrid_block.TENorm``):
  `hybrid_stack_spec` points it at Megatron's plain-torch norm (or the zero-centred stand-in), and
  provides a local (non-TE) stack spec with the same sharded names as the TE spec.
* Mamba mixers need ``mamba_ssm`` (and einops) even to be built: `allow_mamba_build` lets them be
  built (never run) on CPU, with a plain gated-norm module standing in for mamba_ssm's.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from megatron_trt_ext.importer import import_hf

from .models import _config


class ZeroCenteredNorm(torch.nn.Module):
    """Zero-centred gamma: ``norm(x) * (1 + weight)`` (+ bias for LayerNorm)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.config = config
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))
        if not self.rms:
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size))
        setattr(self.weight, "sequence_parallel", False)

    def forward(self, x):
        if self.rms:
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * (1 + self.weight)
        return F.layer_norm(x, (x.shape[-1],), self.weight + 1, self.bias, self.eps)


def _layer_spec(config, qk_layernorm=False, zero_centered=False, num_experts=None):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization=config.normalization,
                                    qk_layernorm=qk_layernorm)
    if zero_centered:
        spec.submodules.input_layernorm = ZeroCenteredNorm
        spec.submodules.pre_mlp_layernorm = ZeroCenteredNorm
    return spec


def _gpt(config, spec, zero_centered, vocab_size, max_seq, tied, model_kwargs, **model_kw):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import transformer_block

    # The final norm is the block's LayerNormImpl (Transformer Engine's when installed): the
    # zero-centred stand-in replaces it while this model is built.
    original = transformer_block.LayerNormImpl
    if zero_centered:
        transformer_block.LayerNormImpl = ZeroCenteredNorm
    try:
        return GPTModel(config, spec, vocab_size=vocab_size, max_sequence_length=max_seq,
                        share_embeddings_and_output_weights=tied, **model_kw, **(model_kwargs or {}))
    finally:
        transformer_block.LayerNormImpl = original


def tiny_qwen3(vocab_size=128, max_seq=64, tied=False, model_kwargs=None, **kw):
    """Qwen3: RMSNorm, per-head q/k RMSNorm before RoPE, head_dim independent of hidden/heads."""
    base = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                bias_activation_fusion=False, qk_layernorm=True, kv_channels=16, layernorm_epsilon=1e-6)
    config = _config(**{**base, **kw})
    return _gpt(config, _layer_spec(config, qk_layernorm=True), False, vocab_size, max_seq, tied, model_kwargs,
                position_embedding_type="rope", rotary_base=1000000)


def tiny_nemotron(vocab_size=128, max_seq=64, tied=False, model_kwargs=None, **kw):
    """Nemotron-3/4: LayerNorm with zero-centred gamma, squared-ReLU MLP, RoPE on half the head."""
    from megatron.core.activations import squared_relu

    base = dict(normalization="LayerNorm", layernorm_zero_centered_gamma=True, gated_linear_unit=False,
                activation_func=squared_relu, add_bias_linear=False, bias_activation_fusion=False)
    config = _config(**{**base, **kw})
    return _gpt(config, _layer_spec(config, zero_centered=True), True, vocab_size, max_seq, tied, model_kwargs,
                position_embedding_type="rope", rotary_percent=0.5, rotary_base=10000)


def tiny_starcoder2(vocab_size=128, max_seq=64, tied=True, model_kwargs=None, window=None, **kw):
    """Starcoder2: LayerNorm with bias, tanh-GeLU MLP, biases on every linear, GQA, RoPE, and an
    optional W-token sliding window (Megatron's window_size=(W-1, 0))."""
    base = dict(normalization="LayerNorm", gated_linear_unit=False, add_bias_linear=True,
                activation_func=functools.partial(F.gelu, approximate="tanh"), bias_activation_fusion=False,
                window_size=(window - 1, 0) if window else None)
    config = _config(**{**base, **kw})
    return _gpt(config, _layer_spec(config), False, vocab_size, max_seq, tied, model_kwargs,
                position_embedding_type="rope", rotary_base=100000)


def tiny_gemma(vocab_size=128, max_seq=64, tied=True, model_kwargs=None, **kw):
    """Gemma: RMSNorm with zero-centred gamma, tanh-GeGLU, embeddings scaled by sqrt(hidden) (MuP's
    embedding multiplier with the standard 1/sqrt(head_dim) attention scale), head_dim 16."""
    hidden = kw.get("hidden_size", 64)
    base = dict(normalization="RMSNorm", layernorm_zero_centered_gamma=True, gated_linear_unit=True,
                activation_func=functools.partial(F.gelu, approximate="tanh"), add_bias_linear=False,
                bias_activation_fusion=False, kv_channels=16, use_mup=True, mup_embedding_mult=hidden ** 0.5,
                mup_attn_scale_power=0.5, layernorm_epsilon=1e-6)
    config = _config(**{**base, **kw})
    return _gpt(config, _layer_spec(config, zero_centered=True), True, vocab_size, max_seq, tied, model_kwargs,
                position_embedding_type="rope", rotary_base=10000)


# ---------------------------------------------------------------------- HybridModel
def allow_mamba_build() -> None:
    """Let MambaMixer be constructed and run without mamba_ssm (test-only): its gated norm is a
    plain-torch stand-in, and its chunked SSD scan (mamba_ssm's CUDA/Triton kernel) is
    transformers' PyTorch reference of the same function (`mamba2_chunk_scan`), when transformers
    is installed. Megatron's own code does everything else (the in_proj split, its plain-torch
    conv1d path, out_proj). The fused training kernel (mamba_split_conv1d_scan_combined) has no
    reference: `tiny_nemotron_h` builds its models with ``use_mamba_mem_eff_path=False``. Where
    mamba_ssm is installed, nothing is replaced."""
    from megatron.core.ssm import mamba_mixer

    if mamba_mixer.mamba_chunk_scan_combined is not None and mamba_mixer.HAVE_MAMBA_SSM:
        return  # the real kernels (or the stand-ins, installed already)

    class GatedNormStandIn(torch.nn.Module):
        """mamba_ssm's RMSNormGated with norm_before_gate=False: RMS-normalise x * silu(z) per group."""

        def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=False, device=None,
                     dtype=None, **kwargs):
            super().__init__()
            if norm_before_gate:
                raise NotImplementedError("the test stand-in norms after the gate, as Megatron's mixer asks")
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
            self.group_size = group_size
            self.eps = eps

        def forward(self, x, z=None):
            dtype, shape = x.dtype, x.shape
            x = x.float()
            if z is not None:
                x = x * F.silu(z.float())
            group = self.group_size or shape[-1]
            x = x.view(*shape[:-1], shape[-1] // group, group)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return (self.weight.float() * x.view(shape)).to(dtype)

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

            return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                       {"weight": 0}, sharded_offsets, tp_group=self.tp_group,
                                                       dp_cp_group=(metadata or {}).get("dp_cp_group"))

    mamba_mixer.HAVE_MAMBA_SSM = True
    mamba_mixer.HAVE_EINOPS = True
    mamba_mixer.RMSNormGated = GatedNormStandIn
    mamba_mixer.ExtendedRMSNorm = GatedNormStandIn
    if mamba_mixer.mamba_chunk_scan_combined is None:
        try:
            from transformers.models.mamba2 import modeling_mamba2
        except ImportError:
            return
        scan = modeling_mamba2.mamba2_chunk_scan
        mamba_mixer.mamba_chunk_scan_combined = getattr(scan, "__wrapped__", scan)


def hybrid_stack_spec(config, num_experts=None, zero_centered=False):
    """A HybridStack spec from Megatron's local (plain-torch) modules, with the TE spec's sharded
    names; the final norm (hard-wired to Transformer Engine) is pointed at the plain-torch one."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import (MoETransformerLayer, TransformerLayer,
                                                             TransformerLayerSubmodules)

    norm = ZeroCenteredNorm if zero_centered else WrappedTorchNorm
    hybrid_block.TENorm = norm  # test stand-in for the final norm
    dense = get_gpt_layer_local_submodules(normalization=config.normalization, qk_layernorm=config.qk_layernorm)
    moe = get_gpt_layer_local_submodules(normalization=config.normalization, num_experts=num_experts) \
        if num_experts else None
    layers = dict(
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=norm, self_attention=dense.self_attention, self_attn_bda=dense.self_attn_bda,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"})),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm, mlp=dense.mlp, mlp_bda=dense.mlp_bda,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})),
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=norm, mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
                in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add, sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"})),
    )
    if moe is not None:
        layers["moe_layer"] = ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm, mlp=moe.mlp, mlp_bda=moe.mlp_bda))
    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(**layers))


def tiny_hybrid(pattern: str = "*-*-", vocab_size=128, max_seq=64, tied=False, model_kwargs=None,
                position_embedding_type="rope", rotary_base=10000, **kw):
    """A HybridModel (megatron-core >= 0.19) of the tiny Llama's sizes by default; ``kw`` go to the
    TransformerConfig (e.g. MoE or Mamba sizes)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    symbols = pattern.split("/")[0].replace("|", "")
    base = dict(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                bias_activation_fusion=False, is_hybrid_model=True, num_layers=len(symbols))
    config = _config(**{**base, **kw})
    if "M" in symbols:
        allow_mamba_build()
    spec = hybrid_stack_spec(config, num_experts=config.num_moe_experts,
                             zero_centered=config.layernorm_zero_centered_gamma)
    return HybridModel(config, spec, vocab_size=vocab_size, max_sequence_length=max_seq,
                       hybrid_layer_pattern=pattern, share_embeddings_and_output_weights=tied,
                       position_embedding_type=position_embedding_type, rotary_base=rotary_base,
                       **(model_kwargs or {}))


# ---------------------------------------------------------------------- Nemotron-H round trips
def tiny_nemotron_h(pattern: str = "M*-M", **kw):
    """A Nemotron-H-shaped HybridModel: Mamba-2 mixers, attention without RoPE, squared-ReLU MLPs."""
    from megatron.core.activations import squared_relu

    base = dict(gated_linear_unit=False, activation_func=squared_relu, position_embedding_type="none",
                mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=2, layernorm_epsilon=1e-5,
                # the fused training kernel only with mamba_ssm (`allow_mamba_build`)
                use_mamba_mem_eff_path=importlib.util.find_spec("mamba_ssm") is not None)
    return tiny_hybrid(pattern, **{**base, **kw})


def nemotron_h_hf_config(model, vocab_size: int):
    """The transformers config of a tiny Nemotron-H with ``model``'s sizes (the test oracle)."""
    import transformers

    config, mixer = model.config, next(layer.mixer for layer in model.decoder.layers if hasattr(layer, "mixer"))
    pattern = model.hybrid_layer_pattern.split("/")[0].replace("|", "")
    types = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    return transformers.NemotronHConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, layers_block_type=[types[s] for s in pattern],
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_query_groups,
        head_dim=config.kv_channels or config.hidden_size // config.num_attention_heads,
        intermediate_size=config.ffn_hidden_size, mlp_hidden_act="relu2", ssm_state_size=mixer.d_state,
        mamba_num_heads=mixer.nheads, mamba_head_dim=mixer.headdim, n_groups=mixer.ngroups,
        conv_kernel=mixer.d_conv, chunk_size=mixer.chunk_size, layer_norm_epsilon=config.layernorm_epsilon,
        tie_word_embeddings=False, time_step_min=1e-9)


def random_nemotron_h(vocab_size: int, seed: int = 0, pattern: str = "M*-M"):
    """A random transformers Nemotron-H and the Megatron HybridModel holding its weights."""
    import transformers

    model = tiny_nemotron_h(pattern)
    config = nemotron_h_hf_config(model, vocab_size)
    torch.manual_seed(seed)
    hf = transformers.NemotronHForCausalLM(config).eval()
    hf.config.architectures = ["NemotronHForCausalLM"]
    with torch.no_grad():  # distinct values everywhere (init leaves norms at one, biases at zero)
        gen = torch.Generator().manual_seed(seed)
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    import_hf(model, hub_names(hf.state_dict()))  # the family table's inverse (HF -> Megatron)
    return model, hf


def hub_names(hf_state: dict) -> dict:
    """transformers' internal Nemotron-H names (``model.``) -> the hub's (``backbone.``), which the
    family table writes and reads."""
    return {k.replace("model.", "backbone.", 1) if k.startswith("model.") else k: v for k, v in hf_state.items()}


# ---------------------------------------------------------------------- MoE families
def _moe_base(**kw):
    return dict(moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
                moe_ffn_hidden_size=32, **kw)


def _block_spec(config, core_attention=None):
    """Megatron's decoder block spec (per-layer dense/MoE), local modules; ``core_attention``
    replaces every layer's (and so the MTP layers') core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron.core.transformer.identity_op import IdentityOp

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization)
    for layer_spec in block.layer_specs:
        attention = layer_spec.submodules.self_attention.submodules
        if core_attention is not None:
            attention.core_attention = core_attention
        if getattr(config, "multi_latent_attention", False) and config.q_lora_rank is None:
            attention.q_layernorm = IdentityOp  # no q LoRA, so no norm between its projections
    return block


def _with_mtp(config, block, model_kw):
    if getattr(config, "mtp_num_layers", None):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        model_kw["mtp_block_spec"] = get_gpt_mtp_block_spec(config, block.layer_specs[-1],
                                                            use_transformer_engine=False)
    return model_kw


def tiny_qwen3_moe(vocab_size=128, max_seq=64, tied=False, model_kwargs=None, **kw):
    """Qwen3-MoE: Qwen3 attention, softmax top-k routing, no shared expert; layer 0 dense."""
    from megatron.core.models.gpt import GPTModel

    base = _moe_base(normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                     bias_activation_fusion=False, qk_layernorm=True, kv_channels=16, layernorm_epsilon=1e-6,
                     num_layers=3, num_moe_experts=4, moe_router_topk=2, moe_layer_freq=[0, 1, 1])
    config = _config(**{**base, **kw})
    block = _block_spec(config)
    return GPTModel(config, block, vocab_size=vocab_size, max_sequence_length=max_seq,
                    position_embedding_type="rope", rotary_base=1000000, share_embeddings_and_output_weights=tied,
                    **(model_kwargs or {}))


def mla_core_attention():
    """Test stand-in: Megatron's local MLA spec hands its core attention k_channels/v_channels,
    which the local DotProductAttention does not take (TE's does); this one takes them and sizes
    its output by the value head dim."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels

    return MLADotProductAttention


def tiny_deepseek(vocab_size=128, max_seq=256, tied=False, model_kwargs=None, q_lora_rank=24, mtp=0, **kw):
    """DeepSeek-V3-shaped: multi-latent attention with YaRN, sigmoid routing with expert bias, group
    top-k and a top-k scaling factor, a shared expert, a dense first layer, optional MTP layers."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    base = _moe_base(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                     hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
                     normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu,
                     add_bias_linear=False, bias_activation_fusion=False, ffn_hidden_size=96,
                     q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_head_dim=12, qk_pos_emb_head_dim=8, v_head_dim=10,
                     rope_type="yarn", rotary_base=10000, rotary_scaling_factor=4.0, mscale=1.0, mscale_all_dim=1.0,
                     original_max_position_embeddings=16, beta_fast=32, beta_slow=1, qk_layernorm=True,
                     num_moe_experts=4, moe_router_topk=2, moe_router_score_function="sigmoid",
                     moe_router_enable_expert_bias=True, moe_router_num_groups=2, moe_router_group_topk=1,
                     moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=32,
                     moe_layer_freq=[0, 1], mtp_num_layers=mtp or None)
    config = MLATransformerConfig(**{**base, **kw})
    block = _block_spec(config, mla_core_attention())
    model_kw = _with_mtp(config, block, {})
    return GPTModel(config, block, vocab_size=vocab_size, max_sequence_length=max_seq, position_embedding_type="none",
                    share_embeddings_and_output_weights=tied, **model_kw, **(model_kwargs or {}))


def tiny_gpt_oss(vocab_size=128, max_seq=64, tied=False, model_kwargs=None, window=8, **kw):
    """GPT-OSS-shaped: learnable attention sinks, sliding window on every other layer, biases in
    attention and experts, the clamped quick-GeLU GLU with +1 on the linear half, YaRN RoPE."""
    from megatron.core.activations import quick_gelu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    base = _moe_base(num_layers=2, normalization="RMSNorm", gated_linear_unit=True, activation_func=quick_gelu,
                     glu_linear_offset=1.0, activation_func_clamp_value=7.0, add_bias_linear=True,
                     bias_activation_fusion=False, kv_channels=16, num_moe_experts=4, moe_router_topk=2,
                     softmax_type="learnable", window_size=(window - 1, 0), window_attn_skip_freq=2)
    config = _config(**{**base, **kw})
    yarn = dict(yarn_rotary_scaling_factor=4.0, yarn_original_max_position_embeddings=16, yarn_beta_fast=32.0,
                yarn_beta_slow=1.0, yarn_mscale=None, yarn_mscale_all_dim=None,
                yarn_correction_range_round_to_int=False)
    for name, value in yarn.items():  # Megatron reads YaRN of standard attention from config attributes
        setattr(config, name, value)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, normalization="RMSNorm")
    return GPTModel(config, spec, vocab_size=vocab_size, max_sequence_length=max_seq, position_embedding_type="yarn",
                    rotary_base=150000, share_embeddings_and_output_weights=tied, **(model_kwargs or {}))
