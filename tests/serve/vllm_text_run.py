"""Run vLLM (offline, in this process) on one HF export WITH its tokenizer, from text, and print what
it computed as JSON: ``python -m tests.serve.vllm_text_run SPEC.json`` where SPEC is ``{"dir": D,
"text": T, "messages": [...], "max_tokens": n}``. A separate process from the tests (see vllm_run)."""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["dir"], dtype="float32", enforce_eager=True, max_model_len=64)  # tokenizer from the export

    def one(out) -> dict:
        gen = out.outputs[0]
        return {"prompt_token_ids": list(out.prompt_token_ids), "token_ids": list(gen.token_ids), "text": gen.text,
                "finish_reason": gen.finish_reason}

    greedy = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    until_eos = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
    text = llm.generate([spec["text"]], greedy, use_tqdm=False)[0]
    stops = llm.generate([spec["text"]], until_eos, use_tqdm=False)[0]
    chat = llm.chat([spec["messages"]], greedy, use_tqdm=False)[0]
    return {"text": one(text), "until_eos": one(stops), "chat": one(chat)}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print("VLLM_TEXT " + json.dumps(run(json.load(f))))
