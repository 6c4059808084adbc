"""CPU trial mode: run Megatron-Core / Megatron-LM on a machine without CUDA (a laptop, CI).

For trying the package and for tests, never for production training. Nothing in the package
imports this module on its own: it is switched on only by ``megatron-trt-ext run --cpu`` (or
``python -m megatron_trt_ext.launch --cpu``), by the demo and by the test suite, and it logs a
warning saying so when it activates.

Some Megatron-Core code asks CUDA for the current device, synchronizes, or builds tensors with
``device="cuda"`` even when the model lives on the CPU. Without CUDA, `install`:

* makes ``torch.cuda.current_device()`` answer ``"cpu"`` and ``torch.cuda.synchronize()`` a no-op;
* enters a TorchFunctionMode that maps any ``cuda`` device argument to ``cpu`` (in the thread that
  installed it);
* defines the Transformer Engine GEMM that megatron-core 0.16.1's MoE router expects as absent.

`install_megatron_training` adds what Megatron-LM's training loop (``megatron.training``) needs;
`stub_triton_only_modules` lets megatron-core 0.19 import without Triton. Each does nothing when
CUDA is available, so none can change a GPU run. The launcher's ``--cpu`` also hides the GPUs
(``CUDA_VISIBLE_DEVICES=""``), adds the Megatron-LM flags a CPU run needs (`cpu_flags`) and runs the
script so that processes multiprocessing spawns from it (Megatron's checkpoint writer) start in
CPU mode too (`run_script`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger("megatron_trt_ext")

BANNER = ("megatron-trt-ext CPU TRIAL MODE: CUDA calls are mapped to the CPU (torch.cuda.current_device, "
          "synchronize, streams, device='cuda'); for trying it out and tests, not for training runs")
SCRIPT_ENV = "MEGATRON_TRT_EXT_CPU_SCRIPT"  # the script a spawned child re-imports (see run_script)
_state = {"installed": False, "mode": None, "training": False}


def active() -> bool:
    """Whether the CPU shim is installed in this process."""
    return bool(_state["installed"])


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
    logger.warning(BANNER)
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
    if importlib.util.find_spec("triton") is not None:
        return []
    core = importlib.util.find_spec("megatron.core")
    if core is None or not core.submodule_search_locations:
        return []
    stubbed = []
    name = "megatron.core.transformer.moe.ops.paged_stash"
    path = Path(list(core.submodule_search_locations)[0]) / "transformer/moe/ops/paged_stash.py"
    if path.is_file() and name not in sys.modules:
        module = types.ModuleType(name, "inert CPU-mode stand-in: Triton kernels are unavailable")

        def _unavailable(*args, **kwargs):
            raise RuntimeError(f"{name}: Triton kernels are not available in CPU mode")

        module.GLOBAL_BLOCK_SIZE = 1024
        module.paged_stash_copy_kernel = _unavailable
        module.paged_stash_pop_kernel = _unavailable
        sys.modules[name] = module
        stubbed.append(name)
    return stubbed


def install_megatron_training() -> bool:
    """CPU stand-ins for Megatron-LM's training loop (``megatron.training``, megatron-core >= 0.18).
    Does nothing when CUDA is available. What it changes:

    * everything `install` does, plus ``typing.override`` on Python 3.11 (0.19's training models
      use the 3.12 decorator) and the Triton-only module stand-in;
    * ``torch.cuda.Stream``/``current_stream``/``stream`` (DDP wrapping) as inert objects, and
      ``torch.cuda.get_rng_state``/``set_rng_state`` mapped to the CPU generator (checkpoint RNG);
    * ``pretrain`` may initialise without CUDA (``allow_no_cuda``), argument checks see a Hopper-class
      device, Megatron's dataset helpers are not compiled with ``make``, and the model-parallel groups
      and RNG tracker that Megatron skips when no GPU is visible are set up.
    """
    import typing

    if torch.cuda.is_available():
        return False
    if not hasattr(typing, "override"):
        typing.override = lambda fn: fn
    stub_triton_only_modules()
    install()
    if _state["training"]:
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
    import megatron.training.arguments as arguments
    import megatron.training.initialize as initialize
    import megatron.training.training as training
    from megatron.core import mpu, tensor_parallel

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


# ------------------------------------------------------------------ the launcher's --cpu
# Megatron-LM flags a CPU run needs (flag, its value or None): gloo instead of NCCL, the local
# (non-Transformer Engine) layers, weights created on the CPU, and no CUDA-only fused kernels.
CPU_FLAGS = (("--distributed-backend", "gloo"), ("--transformer-impl", "local"),
             ("--use-cpu-initialization", None), ("--no-gradient-accumulation-fusion", None),
             ("--no-rope-fusion", None), ("--no-persist-layer-norm", None))


def cpu_flags(script_args: list) -> list:
    """The `CPU_FLAGS` the script's arguments do not give, to go before them (a flag given later
    wins in Megatron-LM's argparse, so the user's own value always stands)."""
    given = {a.split("=", 1)[0] for a in script_args if a.startswith("--")}
    added = []
    for flag, value in CPU_FLAGS:
        if flag not in given:
            added += [flag] if value is None else [flag, value]
    return added


def hide_gpus() -> None:
    """Make CUDA invisible to this process and its children, so Megatron runs on the CPU even
    where a GPU exists. Works while nothing has initialised CUDA yet (the launcher runs first)."""
    from .errors import ConfigError

    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if torch.cuda.is_available():
        raise ConfigError("--cpu: CUDA was initialised before the launcher could hide the GPUs; "
                          "run with CUDA_VISIBLE_DEVICES= set in the environment, or leave out --cpu")


def activate() -> None:
    """Switch this process to CPU mode for Megatron-LM's training loop (the launcher's --cpu)."""
    hide_gpus()
    install_megatron_training()  # logs BANNER


def run_script(script: str) -> None:
    """Run ``script`` as ``__main__`` (as runpy.run_path does) in CPU mode, so that processes
    multiprocessing *spawns* from it are in CPU mode too.

    A spawned child re-imports the parent's main module before it runs anything else (Megatron's
    checkpoint writer starts such a process), and that import alone needs CPU mode on megatron-core
    0.19 without Triton. Multiprocessing re-imports a main module by name when it has a
    ``__spec__``: the script's module names this module, whose ``__mp_main__`` branch (below)
    activates CPU mode and then runs the script (named in the environment) the way a child would.
    """
    path = os.path.abspath(script)
    os.environ[SCRIPT_ENV] = path
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=path, __cached__=None, __loader__=None, __package__=None,
                           __spec__=importlib.machinery.ModuleSpec(__name__, None),
                           __builtins__=sys.modules["builtins"])
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        sys.modules["__main__"] = saved


def _spawned_child() -> dict:
    """In a process multiprocessing spawned from a `run_script` script: CPU mode, then the script
    imported as ``__mp_main__`` (its ``if __name__ == "__main__"`` block does not run)."""
    import runpy

    install_megatron_training()
    return {k: v for k, v in runpy.run_path(os.environ[SCRIPT_ENV], run_name="__mp_main__").items()
            if not (k.startswith("__") and k.endswith("__"))}


if __name__ == "__mp_main__" and os.environ.get(SCRIPT_ENV):  # this file re-run as a spawned child's main
    from megatron_trt_ext.cpu_mode import _spawned_child  # the imported module: one shim state per process

    globals().update(_spawned_child())
