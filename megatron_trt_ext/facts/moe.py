"""Routing facts of a Mixture-of-Experts block, read from the TransformerConfig and the expert modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class MoEFacts:
    """How a MoE layer routes (defaults: Megatron's; expert count, top-k and expert size are `ModelInfo` fields: every
    layout needs them).

    Attributes:
        score: the router's score function (``softmax`` or ``sigmoid``).
        pre_softmax: softmax over all experts before the top-k (else over the k chosen logits).
        scaling_factor: ``moe_router_topk_scaling_factor`` (None: unscaled).
        num_groups, group_topk: group-limited routing (None: off).
        expert_bias: a selection-only per-expert bias (DeepSeek's aux-loss-free balancing).
        shared_size: the shared experts' hidden size (None: no shared experts).
        shared_gate: the shared experts' output is gated.
        router_bias: the router linear has a bias (``add_bias_linear``).
        expert_module: the expert modules' class names, comma-joined (pooled over pipeline ranks).
    """

    score: str = "softmax"
    pre_softmax: bool = False
    scaling_factor: Optional[float] = None
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    expert_bias: bool = False
    shared_size: Optional[int] = None
    shared_gate: bool = False
    router_bias: bool = False
    expert_module: str = ""

    @property
    def routing(self) -> str:
        """The routing as families name it; Mixtral's is ``topk_softmax`` (softmax over the top-k
        logits == softmax, top-k, renormalize)."""
        if self.score == "softmax":
            return "softmax_topk" if self.pre_softmax else "topk_softmax"
        return f"{self.score}_topk"

    @property
    def routed_scaling(self) -> float:
        """The factor the routed experts' weights are multiplied by (1 when unscaled)."""
        return self.scaling_factor if self.scaling_factor is not None else 1.0


def read_moe_facts(config, layers: list) -> MoEFacts:
    """``layers``: this rank's layers (the expert class names are pooled over ranks later)."""
    scaling = getattr(config, "moe_router_topk_scaling_factor", None)
    expert_types = {type(layer.mlp.experts).__name__ for layer in layers
                    if hasattr(getattr(layer, "mlp", None), "experts")}
    return MoEFacts(
        score=getattr(config, "moe_router_score_function", "softmax"),
        pre_softmax=bool(getattr(config, "moe_router_pre_softmax", False)),
        scaling_factor=float(scaling) if scaling is not None else None,
        num_groups=getattr(config, "moe_router_num_groups", None),
        group_topk=getattr(config, "moe_router_group_topk", None),
        expert_bias=bool(getattr(config, "moe_router_enable_expert_bias", False)),
        shared_size=getattr(config, "moe_shared_expert_intermediate_size", None),
        shared_gate=bool(getattr(config, "moe_shared_expert_gate", False)),
        router_bias=bool(config.add_bias_linear),
        expert_module=",".join(sorted(expert_types)),
    )
