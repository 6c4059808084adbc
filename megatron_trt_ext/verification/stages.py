"""The probe's forward pass through pipeline stages, on whatever device the model lives.

Megatron's forward-only schedule allocates its receive buffers on ``torch.cuda.current_device()``,
so on a CPU world (gloo) it fails with "Torch not compiled with CUDA enabled". The probe needs
far less than a schedule: one microbatch, forward only, each stage's activations handed to the
next. Here each chunk receives its input from the previous stage, runs, and sends its output on,
with blocking point-to-point messages on the pipeline group, on the model's own device (CUDA
tensors over NCCL, CPU tensors over gloo). Every rank walks its chunks in order, which is the
global stage order (chunk v of pipeline rank p is stage v * P + p), so the messages never cross.
A stage that fails still tells the next one (an empty header), so no rank waits forever on a
message that never comes: the failure travels down the pipeline and every rank raises.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..forward import eval_mode, preserved_rng

# the activation dtypes a stage may hand on, by code in the header message
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class UpstreamFailure(RuntimeError):
    """An earlier pipeline stage failed; it says why on its own rank."""


def _send(tensor, dst: int, group, device: torch.device) -> None:
    """A header's length, the header (ndim, shape, dtype code), then the activations; a length of
    0 and nothing more when ``tensor`` is None (this stage failed)."""
    if tensor is None:
        torch.distributed.send(torch.zeros(1, dtype=torch.int64, device=device), dst=dst, group=group)
        return
    tensor = tensor.detach().contiguous()
    header = torch.tensor([tensor.dim(), *tensor.shape, _DTYPES.index(tensor.dtype)], dtype=torch.int64,
                          device=tensor.device)
    size = torch.tensor([header.numel()], dtype=torch.int64, device=tensor.device)
    torch.distributed.send(size, dst=dst, group=group)
    torch.distributed.send(header, dst=dst, group=group)
    torch.distributed.send(tensor, dst=dst, group=group)


def _recv(src: int, device: torch.device, group):
    """The previous stage's activations, or None when it failed."""
    size = torch.empty(1, dtype=torch.int64, device=device)
    torch.distributed.recv(size, src=src, group=group)
    if int(size.item()) == 0:
        return None
    header = torch.empty(int(size.item()), dtype=torch.int64, device=device)
    torch.distributed.recv(header, src=src, group=group)
    ndim = int(header[0])
    shape = [int(d) for d in header[1:1 + ndim]]
    out = torch.empty(shape, dtype=_DTYPES[int(header[1 + ndim])], device=device)
    torch.distributed.recv(out, src=src, group=group)
    return out


def staged_forward(chunks: list, tokens: torch.Tensor, on_output: Callable) -> None:
    """Forward ``tokens`` [batch, seq] through this rank's pipeline chunks (unwrapped, as
    `model_info.unwrap_chunks` gives them) in eval mode under no_grad with the RNG states
    restored; call on every rank of the model. ``on_output`` receives the logits where they exist
    (the last stage)."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    prev_rank = ps.get_pipeline_model_parallel_prev_rank()
    next_rank = ps.get_pipeline_model_parallel_next_rank()
    device = tokens.device
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    error = None
    with preserved_rng(), eval_mode(chunks), torch.no_grad():
        try:
            for chunk in chunks:
                first, last = getattr(chunk, "pre_process", True), getattr(chunk, "post_process", True)
                hidden = None if first else _recv(prev_rank, device, group)
                output = None
                if error is None and not first and hidden is None:
                    error = UpstreamFailure("an earlier pipeline stage failed (its rank says why)")
                if error is None:
                    try:
                        chunk.set_input_tensor(hidden)
                        output = chunk(tokens, positions, attention_mask=None)
                        if not last and output.dtype not in _DTYPES:
                            raise TypeError(f"a pipeline stage's activations are {output.dtype}, not one of {_DTYPES}")
                    except Exception as exc:  # noqa: BLE001 - passed down the pipeline, raised below
                        error = exc
                if not last:
                    _send(output if error is None else None, next_rank, group, device)
                elif error is None:
                    on_output(output)
        finally:
            for chunk in chunks:  # hold no received activations after the probe
                chunk.set_input_tensor(None)
    if error is not None:
        raise error
