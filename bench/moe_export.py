"""Benchmark: peak memory of a DeepSeek-V3-shaped MoE export with expert and pipeline parallelism.

Multi-latent attention, 16 experts of which top-4 with sigmoid routing, group-limited top-k and a
shared expert, a dense first layer, one MTP layer; about 240M parameters in bfloat16, trained layout
EP2 x PP2 on 4 gloo processes of this CPU machine, exported to HF in bfloat16. Reports each rank's
export time, peak extra RSS during the export and that peak as a multiple of the largest tensor
(the plan keeps one unit, or one layer's expert group, in flight per writer). Needs megatron-core
>= 0.19 (multi-latent attention without Transformer Engine):

    PYTHONPATH=.venv/mcore-0.19.2 .venv/bin/python -m bench.moe_export
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench.distributed_export import PeakRss, _rss

SIZES = dict(num_layers=4, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096, q_lora_rank=384,
             kv_lora_rank=256, qk_head_dim=64, qk_pos_emb_head_dim=32, v_head_dim=64, num_moe_experts=16,
             moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2, moe_ffn_hidden_size=1024,
             moe_shared_expert_intermediate_size=1024, moe_layer_freq=[0, 1, 1, 1], mtp=1)


def rank_main(rank: int, world_size: int, out: str, layout: dict, exports: int) -> dict:
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_trt_ext import ExportConfig, Exporter
    from tests.support.families import tiny_deepseek

    ps.initialize_model_parallel(pipeline_model_parallel_size=layout["pp"],
                                 expert_model_parallel_size=layout["ep"])
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    kwargs = dict(SIZES)
    mtp = kwargs.pop("mtp")
    model_kwargs = dict(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    model = tiny_deepseek(vocab_size=32768, mtp=mtp, params_dtype=torch.bfloat16, model_kwargs=model_kwargs,
                          expert_model_parallel_size=layout["ep"], pipeline_model_parallel_size=layout["pp"],
                          pipeline_dtype=torch.bfloat16, **kwargs)
    exporter = Exporter(model, ExportConfig(output_dir=out, formats=["hf"], dtype="bfloat16", vocab_size=32000))
    largest = max(u.nbytes for u in exporter.units)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for i in range(exports):
        base = _rss()
        with PeakRss() as peak:
            t0 = time.perf_counter()
            result = exporter.export(i + 1)
            seconds = time.perf_counter() - t0
        assert result.ok
        rows.append({"seconds": seconds, "peak_extra": peak.peak - base})
    return {"rank": rank, "largest": largest, "local_params": params, "rows": rows,
            "bytes": result.bytes_written}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exports", type=int, default=2)
    p.add_argument("--dir", default=None)
    args = p.parse_args(argv)
    from tests.support.distributed import run_ranks

    layout = {"ep": 2, "pp": 2}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        outcome = run_ranks(4, "bench.moe_export:rank_main", timeout_s=1800, out=os.path.join(tmp, "exports"),
                            layout=layout, exports=args.exports)
    rows = []
    for rank, (status, value) in sorted(outcome.items()):
        if status != "ok":
            print(f"rank {rank}: {status}\n{value}")
            return 1
        rows.append(value)
    total_params = sum(r["local_params"] for r in rows)
    mib = 2 ** 20
    print(f"DeepSeek-V3-shaped MoE, EP2 x PP2 (4 ranks), {total_params / 1e6:.0f}M parameters held (bf16), "
          f"export {rows[0]['bytes'] / mib:.0f} MiB of HF safetensors; largest tensor {rows[0]['largest'] / mib:.0f} MiB")
    print("| rank | export seconds | peak extra RSS | x largest tensor |")
    print("|---|---|---|---|")
    for r in rows:
        secs = " / ".join(f"{x['seconds']:.2f}" for x in r["rows"])
        peaks = " / ".join(f"{x['peak_extra'] / mib:.0f} MiB" for x in r["rows"])
        ratios = " / ".join(f"{x['peak_extra'] / r['largest']:.1f}" for x in r["rows"])
        print(f"| {r['rank']} | {secs} | {peaks} | {ratios} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
