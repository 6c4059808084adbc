"""Forward-only passes through a live model's chunks, shared by calibration and the verification
probe: the one place that knows how to drive Megatron's schedule for a pipeline-parallel model.

Both run inside the training stall and must leave training untouched: no grad, the RNG states
(CPU, CUDA, Megatron's tracker) restored, and every module's train/eval flag restored exactly.
The forward passes of a pipeline-parallel (or virtual-pipeline) model go through Megatron's own
schedule (``get_forward_backward_func()``, ``forward_only=True``), so every rank of the model runs
the same schedule and the stages exchange activations the way training does.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Optional

import torch


@contextmanager
def preserved_rng():
    """Save and restore every RNG state a forward pass may touch."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    tracker_states = None
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        tracker_states = {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                          for k, v in tracker.get_states().items()}
    except Exception:  # noqa: BLE001 - no tracker: nothing to restore
        tracker = None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if tracker is not None and tracker_states is not None:
            tracker.set_states(tracker_states)


@contextmanager
def eval_mode(chunks: list):
    """Every module in eval mode, and afterwards each one's own flag back (a model may keep some
    submodules in eval while it trains)."""
    modes = [(module, module.training) for chunk in chunks for module in chunk.modules()]
    try:
        for chunk in chunks:
            chunk.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def is_staged(chunks: list) -> bool:
    """Pipeline-parallel (or virtual-pipeline) chunks: forward passes must run through all stages."""
    return len(chunks) > 1 or any(not (getattr(c, "pre_process", True) and getattr(c, "post_process", True))
                                  for c in chunks)


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def single_stage_loop(batches: list, on_output: Optional[Callable] = None):
    """``loop(model)``: each batch through one chunk that holds the whole model."""
    def loop(model):
        with torch.no_grad():
            for tokens in batches:
                output = model(tokens, _positions(tokens), attention_mask=None)
                if on_output is not None:
                    on_output(output)
    return loop


def pipeline_loop(batches: list, on_output: Optional[Callable] = None):
    """``loop(chunks)``: forward passes through every pipeline stage with Megatron's own schedule
    (forward only); each batch is one microbatch and every rank runs the same schedule.
    ``on_output`` receives the model's output of each microbatch, on the last stage only."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens, _positions(tokens), attention_mask=None)

        def loss_func(out):
            if on_output is not None:
                on_output(out)
            return out.float().sum() * 0.0, {}
        return output, loss_func

    def loop(chunks):
        chunks = list(chunks)
        iterators = [iter(batches) for _ in chunks]
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
                model=chunks, num_microbatches=len(batches), seq_length=batches[0].shape[1],
                micro_batch_size=batches[0].shape[0], forward_only=True)
    return loop


def run_forward(chunks: list, batches: list, on_output: Optional[Callable] = None) -> None:
    """Forward passes of ``batches`` (token tensors [batch, seq], one shape) through the rank's
    chunks, in eval mode under no_grad with the RNG states restored. Call on every rank of the
    model (pipeline stages exchange activations). ``on_output`` sees the outputs where they exist
    (the last stage)."""
    with preserved_rng(), eval_mode(chunks):
        if is_staged(chunks):
            pipeline_loop(batches, on_output)(torch.nn.ModuleList(chunks))
        else:
            single_stage_loop(batches, on_output)(chunks[0])
