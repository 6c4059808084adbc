"""An export with its training tokenizer is served by vLLM from text, as README tells users to serve
it: vLLM loads the export's own tokenizer (no ``skip_tokenizer_init``), encodes a text prompt and a
chat conversation (the tokenizer's chat template) into transformers' ids, generates transformers'
greedy tokens and text, and stops at Megatron's EOD written as an eos id."""

import json
import subprocess
import sys
import zlib

import pytest
import torch

from tests.serve import support

support.require_vllm()

TEXT = "the cat sat on"
MESSAGES = [{"role": "user", "content": "hello world"}]
MAX_TOKENS = 6


def export(model, out, tokenizer_dir, **kw):
    from megatron_trt_ext import ExportConfig, Exporter

    config = ExportConfig(output_dir=str(out), formats=["hf"], dtype="bfloat16", vocab_size=support.VOCAB,
                          mode="sync", tokenizer_dir=str(tokenizer_dir), **kw)
    return Exporter(model, config).export(iteration=1).path / "hf"


@torch.no_grad()
def transformers_greedy(model, ids: list) -> list:
    """Greedy tokens by argmax over the forward pass (see support.greedy), never stopping."""
    ids = list(ids)
    for _ in range(MAX_TOKENS):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-MAX_TOKENS:]


def vllm_text(hf_dir, tmp) -> dict:
    path = tmp / "vllm_text.json"
    path.write_text(json.dumps({"dir": str(hf_dir), "text": TEXT, "messages": MESSAGES, "max_tokens": MAX_TOKENS}))
    done = subprocess.run([sys.executable, "-m", "tests.serve.vllm_text_run", str(path)], cwd=support.ROOT,
                          env=support.vllm_env(), capture_output=True, text=True, timeout=900)
    lines = [l for l in done.stdout.splitlines() if l.startswith("VLLM_TEXT ")]
    assert done.returncode == 0 and lines, f"vLLM failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(lines[-1][len("VLLM_TEXT "):])


def test_vllm_serves_the_export_from_text(megatron_world, tmp_path):
    import transformers

    from tests.support.models import randomize, tiny_llama
    from tests.support.text_tokenizer import EOS, save_tokenizer

    model = tiny_llama(**support.SHAPES)
    randomize(model, seed=zlib.crc32(b"text") % 1000)
    source = save_tokenizer(tmp_path / "tok")
    first = export(model, tmp_path / "first", source)

    tok = transformers.AutoTokenizer.from_pretrained(str(first))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(first), dtype=torch.float32).eval()
    prompt = tok(TEXT).input_ids
    want = transformers_greedy(reference, prompt)
    chat_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    chat_prompt = list(getattr(chat_prompt, "input_ids", chat_prompt))
    want_chat = transformers_greedy(reference, chat_prompt)

    # the same weights, exported with Megatron's EOD set to the 3rd greedy token: generation stops there
    eod = want[2]
    hf_dir = export(model, tmp_path / "eod", source, eod_token_id=eod)
    got = vllm_text(hf_dir, tmp_path)

    assert got["text"]["prompt_token_ids"] == prompt
    assert got["text"]["token_ids"] == want
    # vLLM detokenizes the new tokens after the prompt's: the text transformers adds to the prompt's
    prompt_text = tok.decode(prompt, skip_special_tokens=True)
    assert got["text"]["text"] == tok.decode(prompt + want, skip_special_tokens=True)[len(prompt_text):]
    assert got["chat"]["prompt_token_ids"] == chat_prompt
    assert got["chat"]["token_ids"] == want_chat
    stop = next(i for i, t in enumerate(want) if t in (EOS, eod))
    assert got["until_eos"]["token_ids"] == want[:stop + 1]
    assert got["until_eos"]["finish_reason"] == "stop"
