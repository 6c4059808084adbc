"""MoE block pieces that families compose (Megatron's MoELayer -> a hub checkpoint's names).

After the plan's expansion Megatron's experts are ``MEGATRON_EXPERT.linear_fc1/2`` (the checkpoint
layout shared by SequentialMLP and grouped-GEMM experts), the router ``mlp.router.weight``
(+ ``expert_bias``, + ``bias`` with linear biases) and shared experts
``mlp.shared_experts.linear_fc1/2``. They apply to MoE layers only (decoder and MTP).
"""

from .conditions import MOE_LAYERS, ROUTER_BIAS, SHARED_EXPERTS
from .spec import MEGATRON_EXPERT, MEGATRON_LAYER, GatedMLP, Rename

ROUTER = f"{MEGATRON_LAYER}.mlp.router"
SHARED = f"{MEGATRON_LAYER}.mlp.shared_experts"


def router(dst: str, bias: str = "", expert_bias: str = "") -> tuple:
    """The router's weight to ``dst``; its bias (with linear biases) and DeepSeek's selection-only
    expert bias where the target names them."""
    out = (Rename(f"{ROUTER}.weight", on=MOE_LAYERS, dst=dst),)
    if bias:
        out += (Rename(f"{ROUTER}.bias", on=MOE_LAYERS, dst=bias, when=ROUTER_BIAS),)
    if expert_bias:
        out += (Rename(f"{ROUTER}.expert_bias", on=MOE_LAYERS, dst=expert_bias),)
    return out


def experts(prefix: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> tuple:
    """Per-expert hub names: ``{prefix}.{E}.{gate|up|down}.weight``."""
    return (
        GatedMLP(f"{MEGATRON_EXPERT}.linear_fc1.weight", on=MOE_LAYERS,
                 gate=f"{prefix}.{{E}}.{gate}.weight", up=f"{prefix}.{{E}}.{up}.weight"),
        Rename(f"{MEGATRON_EXPERT}.linear_fc2.weight", on=MOE_LAYERS, dst=f"{prefix}.{{E}}.{down}.weight"),
    )


def shared_experts(prefix: str) -> tuple:
    return (
        GatedMLP(f"{SHARED}.linear_fc1.weight", on=MOE_LAYERS, when=SHARED_EXPERTS,
                 gate=f"{prefix}.gate_proj.weight", up=f"{prefix}.up_proj.weight"),
        Rename(f"{SHARED}.linear_fc2.weight", on=MOE_LAYERS, when=SHARED_EXPERTS, dst=f"{prefix}.down_proj.weight"),
    )


def dense_layers_of(info) -> list:
    """Indices of decoder layers with a dense MLP."""
    return [i for i, kind in enumerate(info.decoder_kinds) if kind == "D"]
