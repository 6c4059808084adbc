"""vLLM plugin entry point (`vllm.general_plugins`): registers our weight-transfer backend.

vLLM calls `register` in every process it starts (API server, engine core, workers), possibly more
than once, so it must be idempotent and cheap. vLLM is imported only here, inside vLLM's own
processes: `megatron_trt_ext` itself imports without vLLM installed.
"""

BACKEND = "megatron_trt_ext"


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:  # lazily: the engine module (and what it imports) loads only when a server uses it
        WeightTransferEngineFactory.register_engine(BACKEND, "megatron_trt_ext.serve.engine", "MegatronTrtExtEngine")
    except ValueError:
        pass  # registered already in this process
