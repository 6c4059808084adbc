from . import _major_minor, record

if _major_minor() >= (1, 3):
    raise ImportError("the TensorRT backend was removed from TensorRT-LLM 1.3 (test double)")

import json
import os
import time


class BuildConfig:
    def __init__(self, values, plugin_config):
        self.values = values
        self.plugin_config = plugin_config

    @classmethod
    def from_dict(cls, values, plugin_config=None):
        return cls(dict(values), plugin_config)


class _Engine:
    def __init__(self, model, build_config):
        self.model, self.build_config = model, build_config

    def save(self, engine_dir):
        rank = self.model.config.rank
        with open(os.path.join(engine_dir, f"rank{rank}.engine"), "w") as f:
            json.dump({"architecture": self.model.config.architecture, "rank": rank,
                       "build_config": self.build_config.values}, f)
        if rank == 0:
            with open(os.path.join(engine_dir, "config.json"), "w") as f:
                json.dump({"version": "fake", "pretrained_config": self.model.config.data,
                           "build_config": self.build_config.values}, f)
        record("engine.save", rank=rank, engine_dir=engine_dir)


def build(model, build_config):
    record("build", rank=model.config.rank, build_config=build_config.values,
           plugins=dict(vars(build_config.plugin_config)))
    if os.environ.get("FAKE_TRTLLM_FAIL_RANK") == str(model.config.rank):
        raise RuntimeError(f"injected build failure on rank {model.config.rank}")
    time.sleep(float(os.environ.get("FAKE_TRTLLM_BUILD_S", "0")))  # a long build (seconds)
    return _Engine(model, build_config)
