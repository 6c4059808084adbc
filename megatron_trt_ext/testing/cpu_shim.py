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
