"""CPU shim for Megatron-Core, for tests and the demo ONLY.

Some Megatron-Core code asks CUDA for the current device, synchronizes, or builds masks with
``device="cuda"`` even when the model lives on the CPU. On a machine without CUDA this shim:

* makes ``torch.cuda.current_device()`` answer ``"cpu"`` and ``torch.cuda.synchronize()`` a no-op;
* enters a TorchFunctionMode that maps any ``cuda`` device argument to ``cpu`` (in the thread that
  installed it).

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
    return True


def is_installed() -> bool:
    return _state["installed"]
