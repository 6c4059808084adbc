"""Test-only stand-in for ``torch.utils.tensorboard`` where the tensorboard package is not
installed: Megatron-LM then builds its writer from this SummaryWriter, which appends every scalar
to ``<log_dir>/scalars.jsonl`` (tag, value, step) instead of an event file.

`install()` puts it in ``sys.modules`` only when the real module cannot be imported."""

import json
import os
import sys
import types


class SummaryWriter:
    def __init__(self, log_dir=None, max_queue=10, **kwargs):
        self.log_dir = log_dir or "runs"
        os.makedirs(self.log_dir, exist_ok=True)
        self.path = os.path.join(self.log_dir, "scalars.jsonl")

    def add_scalar(self, tag, value, global_step=None, *args, **kwargs):
        with open(self.path, "a") as f:
            f.write(json.dumps({"tag": tag, "value": float(value), "step": global_step}) + "\n")

    def add_text(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def install() -> bool:
    """True when the stand-in was installed (the real torch.utils.tensorboard is unavailable)."""
    try:
        import torch.utils.tensorboard  # noqa: F401

        return False
    except ImportError:
        module = types.ModuleType("torch.utils.tensorboard")
        module.SummaryWriter = SummaryWriter
        sys.modules["torch.utils.tensorboard"] = module
        return True
