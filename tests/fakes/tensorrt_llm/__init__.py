"""Test double of TensorRT-LLM: the documented API surface the builder uses, recording each call.

FAKE_TRTLLM_VERSION picks the version (default 1.2.0, with the TensorRT backend; 1.3+ has none).
FAKE_TRTLLM_LOG is a JSON-lines file that receives one record per call.
FAKE_TRTLLM_BUILD_S makes each rank's engine build take that many seconds.
"""

import json
import os

__version__ = os.environ.get("FAKE_TRTLLM_VERSION", "1.2.0")


def _major_minor():
    return tuple(int(x) for x in __version__.split(".")[:2])


def record(call, **fields):
    path = os.environ.get("FAKE_TRTLLM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"call": call, "pid": os.getpid(),
                                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), **fields}) + "\n")


class SamplingParams:
    def __init__(self, max_tokens=16, **kwargs):
        self.max_tokens = max_tokens


class _Completion:
    def __init__(self, text):
        self.text = text


class _Output:
    def __init__(self, text):
        self.outputs = [_Completion(text)]


class LLM:
    def __init__(self, model, tensor_parallel_size=1, **kwargs):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"{model}/config.json")
        self.model = model
        record("LLM", model=model, tensor_parallel_size=tensor_parallel_size)

    def generate(self, prompts, sampling_params=None):
        record("LLM.generate", prompts=prompts, max_tokens=sampling_params.max_tokens)
        return [_Output(" fake continuation") for _ in prompts]
