"""Megatron-Bridge 0.6.2 on a CPU-only Python 3.11 machine, for tests ONLY.

Bridge declares Python 3.12 and pins transformers <= 5.12.1 and several GPU-side packages; its
training loop itself needs none of them. `install()` makes its training modules importable and
its loop runnable here:

* ``megatron.bridge`` and ``megatron.bridge.models`` are registered without running their
  ``__init__`` (which imports every model family, some against transformers APIs 5.24 removed);
  ``megatron.bridge.models`` resolves only the two providers the training code names;
* inert stand-ins for packages the training path imports but never uses here (HF ``datasets``,
  ``PIL``, ``megatron.energon``, ``nvidia_resiliency_ext``, torch's TensorBoard writer) and for
  ``megatron.bridge.peft.lora_layers`` (imports Transformer Engine unconditionally); Transformer
  Engine itself is never faked, so megatron-core keeps seeing it absent;
* the CPU stand-ins of `cpu_shim.install_megatron_training`, plus Bridge's own places that
  assume CUDA (``allow_no_cuda``, dataset helpers, the RNG tracker).

Does nothing to the loop when CUDA is available. Never imported by production code.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types


_done = {"installed": False}


def _stand_in(name: str) -> types.ModuleType:
    """An inert module: Capitalized attributes are empty classes, others nested stand-ins."""
    class StandIn(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            value = type(attr, (), {}) if attr[:1].isupper() else _stand_in(f"{name}.{attr}")
            setattr(self, attr, value)
            return value

    module = StandIn(name, "inert test stand-in (tests.support.bridge_shim)")
    module.__path__ = []
    module.__spec__ = importlib.util.spec_from_loader(name, None, is_package=True)
    sys.modules.setdefault(name, module)
    return sys.modules[name]


def _package_without_init(name: str, names: dict | None = None) -> None:
    spec = importlib.util.find_spec(name)
    path = list(spec.submodule_search_locations)
    module = types.ModuleType(name)
    module.__path__ = path
    module.__spec__ = importlib.util.spec_from_loader(name, None, is_package=True)
    module.__spec__.submodule_search_locations = path

    def __getattr__(attr):
        if attr not in (names or {}):
            raise AttributeError(attr)
        return getattr(importlib.import_module(names[attr]), attr)

    module.__getattr__ = __getattr__
    sys.modules[name] = module


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:
        return True


def install() -> None:
    if _done["installed"]:
        return
    from examples.cpu_shim import install_megatron_training

    cpu = install_megatron_training()  # typing.override, Triton stand-in, CUDA stand-ins
    import megatron.core  # noqa: F401

    _package_without_init("megatron.bridge")
    _package_without_init("megatron.bridge.models", {
        "GPTModelProvider": "megatron.bridge.models.gpt_provider",
        "T5ModelProvider": "megatron.bridge.models.t5_provider"})
    for name in ("datasets", "PIL", "megatron.energon", "nvidia_resiliency_ext", "nvidia_resiliency_ext.inprocess"):
        if _missing(name):
            _stand_in(name)
    _stand_in("torch.utils.tensorboard")
    _stand_in("torch.utils.tensorboard.writer")
    _stand_in("megatron.bridge.peft.lora_layers")
    import megatron.bridge.models.conversion  # noqa: F401  (this import order avoids a circular import)

    if cpu:
        from megatron.core import tensor_parallel
        import megatron.bridge.training.initialize as initialize
        import megatron.bridge.training.setup as setup

        setup.initialize_megatron = functools.partial(setup.initialize_megatron, allow_no_cuda=True)
        initialize.compile_helpers = lambda: None
        original = initialize._set_random_seed

        def _set_random_seed(*args, **kwargs):  # skips the model-parallel RNG tracker without CUDA
            original(*args, **kwargs)
            tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True)

        initialize._set_random_seed = _set_random_seed
    _done["installed"] = True
