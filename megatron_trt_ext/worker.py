"""The export worker: a process of its own per training rank (spawned, never forked from the
trainer), so conversion and writing neither hold the trainer's GIL nor can crash it.

The workers of all ranks form their own gloo world for the transfers; each reads its rank's
snapshot from shared memory that the trainer filled.
"""

from __future__ import annotations

import sys
import traceback


def worker_main(conn, job, buffers: dict, addr: str, port: int) -> None:
    """Serve export requests from the trainer until told to stop."""
    import torch

    torch.set_num_threads(1)  # leave the cores to training; the work here is mostly copies and I/O
    from .build.runner import launch_after_export
    from .errors import ExportError
    from .gather import Comm
    from .job import ExportResult
    from .plan import LocalPiece

    try:
        if job.world_size > 1:
            from datetime import timedelta

            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=job.rank,
                                    world_size=job.world_size, timeout=timedelta(seconds=job.config.timeout_s))
        if job.quant is not None and job.quant.algo is not None:
            import modelopt.torch.export.quant_utils  # noqa: F401  (seconds to import: not on the first export)
        comm = Comm(job.config.timeout_s, torch.device("cpu"))
        local: dict = {}
        for (name, offset, shape), buf in buffers.items():
            local.setdefault(name, []).append(LocalPiece(offset, shape, buf, True))
    except BaseException as exc:  # noqa: BLE001
        conn.send(("broken", f"{type(exc).__name__}: {exc}"))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "stop":
            return
        _, iteration, timings = msg
        try:
            result = job.run(comm, local, iteration, timings)
            conn.send(("done", result))
            launch_after_export(job.config, job.rank, result)
        except ExportError as exc:
            conn.send(("done", ExportResult(iteration, None, "failed", list(job.config.formats), timings, 0,
                                            str(exc))))
        except BaseException as exc:  # noqa: BLE001
            text = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            conn.send(("done", ExportResult(iteration, None, "failed", list(job.config.formats), timings, 0,
                                            text)))
        sys.stdout.flush()
