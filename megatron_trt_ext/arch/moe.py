"""MoE block pieces that families compose (Megatron's MoELayer -> a hub checkpoint's names).

After the plan's expansion Megatron's experts are ``{P}.mlp.experts.experts.{E}.linear_fc1/2`` (the
checkpoint layout shared by SequentialMLP and grouped-GEMM experts), the router
``{P}.mlp.router.weight`` (+ ``expert_bias``, + ``bias`` with linear biases) and shared experts
``{P}.mlp.shared_experts.linear_fc1/2``. They apply to MoE layers only (``on="Ee"``: E for a
decoder layer, e for an MTP layer).
"""

from .spec import GatedMLP, Rename

MOE = "Ee"


def router(P: str, dst: str, bias: str = "", expert_bias: str = "") -> tuple:
    out = (Rename(f"{P}.mlp.router.weight", on=MOE, dst=dst),)
    if bias:
        out += (Rename(f"{P}.mlp.router.bias", on=MOE, dst=bias, required="moe_router_bias"),)
    if expert_bias:
        out += (Rename(f"{P}.mlp.router.expert_bias", on=MOE, dst=expert_bias),)
    return out


def experts(P: str, prefix: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> tuple:
    """Per-expert hub names: ``{prefix}.{E}.{gate|up|down}.weight``."""
    return (
        GatedMLP(f"{P}.mlp.experts.experts.{{E}}.linear_fc1.weight", on=MOE,
                 gate=f"{prefix}.{{E}}.{gate}.weight", up=f"{prefix}.{{E}}.{up}.weight"),
        Rename(f"{P}.mlp.experts.experts.{{E}}.linear_fc2.weight", on=MOE, dst=f"{prefix}.{{E}}.{down}.weight"),
    )


def shared_experts(P: str, prefix: str) -> tuple:
    return (
        GatedMLP(f"{P}.mlp.shared_experts.linear_fc1.weight", on=MOE, required="moe_shared_experts",
                 gate=f"{prefix}.gate_proj.weight", up=f"{prefix}.up_proj.weight"),
        Rename(f"{P}.mlp.shared_experts.linear_fc2.weight", on=MOE, required="moe_shared_experts",
               dst=f"{prefix}.down_proj.weight"),
    )


def dense_layers_of(info) -> list:
    """Indices of decoder layers with a dense MLP."""
    return [i for i, kind in enumerate(info.decoder_kinds) if kind == "D"]
