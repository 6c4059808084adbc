"""Serve what is being trained: stream converted tensors (HF names, what the HF export writes) into
a running vLLM server, with no file written.

* `client`: the training side of one refit (`refit`, `VLLMServer`, `RefitError`);
* `writer` / `reader` / `wire`: the host transport (TCP, safetensors frames, many writers at once);
* `engine` / `plugin`: the server side, a vLLM weight-transfer backend named ``megatron_trt_ext``
  registered through the ``vllm.general_plugins`` entry point. Only these two import vLLM, and only
  inside vLLM's processes.
"""
