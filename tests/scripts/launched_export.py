"""A multi-rank async export under a real launcher (torchrun, torch.distributed.run --standalone).

    torchrun --nproc-per-node 2 tests/scripts/launched_export.py OUTPUT_DIR

TP2 tiny Llama on gloo (CPU), `attach` in its default async mode, two saves, then detach. Each
rank writes what it saw to ``<OUTPUT_DIR>.rank<N>.json`` (a file: the launcher interleaves the
ranks' stdout); the test reads them.
"""

import json
import os
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository: examples/, tests/support/


def main(output_dir: str) -> None:
    from examples.cpu_shim import install, stub_triton_only_modules

    stub_triton_only_modules()
    install()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_trt_ext import ExportConfig, attach
    from tests.support.models import tiny_llama

    dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_cuda_manual_seed(1234, inference_rng_tracker=True)
    model = tiny_llama(tensor_model_parallel_size=2)
    handle = attach(model, ExportConfig(output_dir=output_dir, vocab_size=120, timeout_s=60))
    seen = {"agent_store": os.environ.get("TORCHELASTIC_USE_AGENT_STORE")}
    t0 = time.monotonic()
    results = []
    for iteration in (10, 20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        handle.on_checkpoint_saved(iteration=iteration)
        results.append(handle.wait())
    handle.detach()
    seen.update(statuses=[r.status for r in results], errors=[r.error for r in results],
                paths=[str(r.path) for r in results], seconds=time.monotonic() - t0, rank=dist.get_rank())
    with open(f"{output_dir}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
