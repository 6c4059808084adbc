"""Serve what is being trained: stream converted tensors (HF names, what the HF export writes) into
a running vLLM server, with no file written.

* `options`: the recipe section ``serve:`` (`ServeOptions`), checked at attach;
* `sink`: an export run's refit (`RefitSink`): every rank streams the converted HF tensors as the
  export produces them, rank 0 drives the server; the outcome lands in the manifest's ``serve``;
* `client`: the training side of one refit (`refit`, `VLLMServer`, `RefitError`);
* `writer` / `reader` / `wire`: the host transport (TCP, safetensors frames, many writers at once);
* `engine` / `plugin`: the server side, a vLLM weight-transfer backend named ``megatron_trt_ext``
  registered through the ``vllm.general_plugins`` entry point. Only these two import vLLM, and only
  inside vLLM's processes.
"""
