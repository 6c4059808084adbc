"""Run vLLM (offline, in this process) on HF export directories and print what it computed, as JSON:
``python -m tests.serve.vllm_run SPEC.json`` where SPEC is ``[{"dir": D, "prompts": [[ids]],
"max_tokens": n}]``. A separate process from the tests, which hold Megatron's one-rank world and
transformers' reference models (vLLM would replace some of transformers' activations)."""

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def run(spec: list) -> list:
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    results = []
    for case in spec:
        kwargs = {"dtype": "float32", **case.get("kwargs", {})}  # a GPU check runs quantized kernels in bf16
        llm = LLM(model=case["dir"], enforce_eager=True, skip_tokenizer_init=True,
                  max_model_len=case.get("max_model_len", 64), **kwargs)
        params = SamplingParams(temperature=0, max_tokens=case["max_tokens"], prompt_logprobs=1, logprobs=1,
                                detokenize=False, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in case["prompts"]], params, use_tqdm=False)
        per_prompt = []
        for prompt, out in zip(case["prompts"], outs):
            gen = out.outputs[0]
            per_prompt.append({
                "tokens": list(gen.token_ids),
                "logprobs": [step[tok].logprob for step, tok in zip(gen.logprobs, gen.token_ids)],
                "prompt_logprobs": [None] + [step[tok].logprob for step, tok in
                                             zip(out.prompt_logprobs[1:], prompt[1:])],
            })
        results.append(per_prompt)
        del llm, outs
        gc.collect()
        cleanup_dist_env_and_memory()
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    print("VLLM_RESULTS " + json.dumps(run(spec)))
