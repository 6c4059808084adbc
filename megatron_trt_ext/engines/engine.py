"""The only module that imports ``tensorrt_llm``. Runs in a process of its own (never in the trainer).

Written against TensorRT-LLM's documented Python API:

* TensorRT backend (TensorRT-LLM <= 1.2): ``PretrainedConfig.from_json_file`` ->
  ``config.set_rank(r)`` -> ``MODEL_MAP[architecture].from_checkpoint(dir, config=...)`` ->
  ``tensorrt_llm.builder.build(model, BuildConfig.from_dict(...))`` -> ``engine.save(dir)``:
  one engine per inference rank (what ``trtllm-build`` does).
* TensorRT-LLM >= 1.3 has no TensorRT backend (no ``tensorrt_llm.builder``): the HF export is the
  deployable artifact; the optional deploy check loads it with ``tensorrt_llm.LLM`` and generates.

    python -m megatron_trt_ext.engines.engine probe
    python -m megatron_trt_ext.engines.engine rank CHECKPOINT_DIR RANK ENGINE_DIR OPTIONS_JSON
    python -m megatron_trt_ext.engines.engine deploy-check HF_DIR TP
"""

from __future__ import annotations

import copy
import json
import sys


def probe() -> dict:
    """Which TensorRT-LLM is installed, and whether it can build engines."""
    import tensorrt_llm

    try:
        import tensorrt_llm.builder  # noqa: F401
        backend = True
    except ImportError:
        backend = False
    return {"version": getattr(tensorrt_llm, "__version__", "unknown"), "tensorrt_backend": backend}


def build_rank(checkpoint_dir: str, rank: int, engine_dir: str, options: dict) -> dict:
    """Build and save the engine of one inference rank."""
    from tensorrt_llm.builder import BuildConfig, build
    from tensorrt_llm.models import MODEL_MAP
    from tensorrt_llm.models.modeling_utils import PretrainedConfig
    from tensorrt_llm.plugin import PluginConfig

    config = PretrainedConfig.from_json_file(f"{checkpoint_dir}/config.json")
    rank_config = copy.deepcopy(config)
    rank_config.set_rank(rank)
    architecture = config.architecture
    if architecture not in MODEL_MAP:
        raise ValueError(f"TensorRT-LLM {probe()['version']} has no model class for {architecture!r}")
    model = MODEL_MAP[architecture].from_checkpoint(checkpoint_dir, config=rank_config)
    plugin_config = PluginConfig()
    for name, value in options.get("plugins", {}).items():
        setattr(plugin_config, name, value)
    build_config = BuildConfig.from_dict(
        {key: options[key] for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens",
                                       "max_beam_width")},
        plugin_config=plugin_config)
    engine = build(model, build_config)
    engine.save(engine_dir)
    return {"rank": rank, "architecture": architecture}


def deploy_check(hf_dir: str, tp: int, prompt: str = "The capital of France is", tokens: int = 8) -> dict:
    """Load the HF export with TensorRT-LLM's LLM API and generate a few tokens."""
    from tensorrt_llm import LLM, SamplingParams

    llm = LLM(model=hf_dir, tensor_parallel_size=tp)
    outputs = llm.generate([prompt], SamplingParams(max_tokens=tokens))
    text = outputs[0].outputs[0].text
    return {"prompt": prompt, "generated": text, "ok": bool(text is not None)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else ""
    if command == "probe":
        out = probe()
    elif command == "rank":
        checkpoint_dir, rank, engine_dir, options = argv
        out = build_rank(checkpoint_dir, int(rank), engine_dir, json.loads(options))
    elif command == "deploy-check":
        hf_dir, tp = argv
        out = deploy_check(hf_dir, int(tp))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print("MEGATRON_TRT_EXT_RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
