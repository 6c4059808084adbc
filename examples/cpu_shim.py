"""CPU shim for Megatron-Core, for tests and the demo ONLY.

Some Megatron-Core code asks CUDA for the current device, synchronizes, or builds masks with
``device="cuda"`` even when the model lives on the CPU. On a machine without CUDA this shim:

* makes ``torch.cuda.current_device()`` answer ``"cpu"`` and ``torch.cuda.synchronize()`` a no-op;
* enters a TorchFunctionMode that maps any ``cuda`` device argument to ``cpu`` (in the thread that
  installed it);
* defines the Transformer Engine GEMM that megatron-core 0.16.1's MoE router expects as absent.

`install()` does nothing when CUDA is available, so it can never change a GPU run. No module of the
package's production path imports this file.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_state = {"installed": False, "mode": None}


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def install() -> bool:
    """Install the shim if CUDA is absent. Returns True when it is active."""
    if torch.cuda.is_available():
        return False
    if _state["installed"]:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    mode = _CudaToCpu()
    mode.__enter__()
    _state.update(installed=True, mode=mode)
    _patch_megatron()
    return True


class function_mode_paused:
    """Leave the cuda-to-cpu TorchFunctionMode for a block (benchmarks): it intercepts every torch
    call, which would add Python overhead to what they time. ``torch.cuda.current_device`` and
    ``synchronize`` stay patched."""

    def __enter__(self):
        self.mode = _state["mode"]
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__enter__()


def _patch_megatron() -> None:
    """megatron-core 0.16.1's MoE router names ``te_general_gemm`` without defining it when
    Transformer Engine is absent (NameError on the first MoE forward); define it as absent."""
    stub_triton_only_modules()
    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:
        return
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None



def stub_triton_only_modules() -> list:
    """Stand in for Megatron-Core modules that import ``triton`` unconditionally.

    megatron-core 0.19 imports ``transformer/moe/ops/paged_stash.py`` (Triton kernels for MoE
    paging, unused on CPU) on every ``import megatron.core``. Without triton installed (~1 GB) that
    import fails. This registers an inert module under that one name, so ``triton`` itself stays
    absent for every other ``try: import triton`` check. Must run before ``import megatron.core``;
    does nothing when triton is installed or the module does not exist in this version.
    """
    import importlib.util
    import sys
    import types
    from pathlib import Path

    if importlib.util.find_spec("triton") is not None:
        return []
    core = importlib.util.find_spec("megatron.core")
    if core is None or not core.submodule_search_locations:
        return []
    stubbed = []
    name = "megatron.core.transformer.moe.ops.paged_stash"
    path = Path(list(core.submodule_search_locations)[0]) / "transformer/moe/ops/paged_stash.py"
    if path.is_file() and name not in sys.modules:
        module = types.ModuleType(name, "inert CPU-test stand-in: Triton kernels are unavailable")

        def _unavailable(*args, **kwargs):
            raise RuntimeError(f"{name}: Triton kernels are not available in CPU tests")

        module.GLOBAL_BLOCK_SIZE = 1024
        module.paged_stash_copy_kernel = _unavailable
        module.paged_stash_pop_kernel = _unavailable
        sys.modules[name] = module
        stubbed.append(name)
    return stubbed


def install_megatron_training() -> bool:
    """CPU stand-ins for Megatron-LM's training loop (``megatron.training``, megatron-core >= 0.18),
    for tests and the demo ONLY. Does nothing when CUDA is available. What it changes:

    * everything `install` does, plus ``typing.override`` on Python 3.11 (0.19's training models
      use the 3.12 decorator) and the Triton-only module stand-in;
    * ``torch.cuda.Stream``/``current_stream``/``stream`` (DDP wrapping) as inert objects, and
      ``torch.cuda.get_rng_state``/``set_rng_state`` mapped to the CPU generator (checkpoint RNG);
    * ``pretrain`` may initialise without CUDA (``allow_no_cuda``), argument checks see a Hopper-class
      device, Megatron's dataset helpers are
      not compiled with ``make``, and the model-parallel groups and RNG tracker that Megatron
      skips when no GPU is visible are set up.
    """
    import contextlib
    import functools
    import typing

    if torch.cuda.is_available():
        return False
    if not hasattr(typing, "override"):
        typing.override = lambda fn: fn
    stub_triton_only_modules()
    install()
    if _state.get("training"):
        return True

    class _InertStream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, *args, **kwargs):
            pass

        def synchronize(self):
            pass

    torch.cuda.Stream = _InertStream
    torch.cuda.current_stream = lambda *args, **kwargs: _InertStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda *args, **kwargs: None

    import megatron.core.datasets.utils as dataset_utils
    import megatron.training.initialize as initialize
    import megatron.training.training as training
    from megatron.core import mpu, tensor_parallel

    import megatron.training.arguments as arguments

    arguments.get_device_arch_version = lambda: 9  # argument checks ask the GPU's architecture (TP > 1)
    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    dataset_utils.compile_helpers = lambda: None
    original = initialize._initialize_distributed

    def _initialize_distributed(get_embedding_ranks, get_position_embedding_ranks, store,
                                skip_model_parallel_init=False):
        original(get_embedding_ranks, get_position_embedding_ranks, store,
                 skip_model_parallel_init=skip_model_parallel_init)
        args = initialize.get_args()
        if not skip_model_parallel_init and not mpu.model_parallel_is_initialized():
            mpu.initialize_model_parallel(
                args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                args.virtual_pipeline_model_parallel_size, context_parallel_size=args.context_parallel_size,
                expert_model_parallel_size=args.expert_model_parallel_size,
                get_embedding_ranks=get_embedding_ranks,
                get_position_embedding_ranks=get_position_embedding_ranks,
                create_gloo_process_groups=args.use_gloo_process_groups)
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True)

    initialize._initialize_distributed = _initialize_distributed
    _state["training"] = True
    return True
