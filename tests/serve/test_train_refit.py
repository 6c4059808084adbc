"""A training run with ``serve:`` set (issue 19, item 2, "done when"): a tiny Llama trains a few
steps under `attach` (async exports), refitting a stock vLLM OpenAI server started as README says
at every save; at the end the server answers ``/v1/completions`` prompt logprobs equal to a fresh
load of the last save's export, and reports the last iteration as its version."""

import json

import torch

from tests.serve import support
from tests.support.models import randomize, tiny_llama

support.require_vllm()

from megatron_trt_ext import ExportConfig, attach  # noqa: E402
from megatron_trt_ext.manifest import latest_export  # noqa: E402
from megatron_trt_ext.serve.client import VLLMServer  # noqa: E402
from megatron_trt_ext.utils import free_port  # noqa: E402


def test_training_run_ends_with_the_server_serving_the_last_save(megatron_world, tmp_path):
    from megatron.core import dist_checkpointing

    model = tiny_llama(**support.SHAPES)
    randomize(model, seed=5)
    initial = support.export_hf(model, tmp_path / "initial", 0)  # what the server starts on
    server = support.Server(initial, free_port(), tmp_path / "server.log")
    try:
        server.wait_ready()
        config = ExportConfig(output_dir=str(tmp_path / "exports"), formats=["hf"], dtype="bfloat16",
                              vocab_size=support.VOCAB, serve={"url": server.url, "timeout_s": 120})
        handle = attach(model, config)  # async: refits run in the export worker
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, support.VOCAB, (2, 16), generator=gen)
        positions = torch.arange(16).unsqueeze(0).expand_as(tokens)
        for step in range(1, 5):
            loss = model(tokens, positions, attention_mask=None, labels=tokens.roll(-1, 1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 2 == 0:
                ckpt = tmp_path / "checkpoints" / f"iter_{step:07d}"
                ckpt.mkdir(parents=True)
                dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
        handle.detach()  # waits for the running export and its refit

        last = latest_export(tmp_path / "exports")
        assert last is not None and last.name == "iter_0000004"
        records = [json.loads((tmp_path / "exports" / f"iter_{i:07d}" / "manifest.json").read_text())["serve"]
                   for i in (2, 4)]
        assert [(r["status"], r["version"]) for r in records] == [("complete", "2"), ("complete", "4")], records
        control = VLLMServer(server.url)
        assert control.weight_version() == "4" and not control.is_paused()

        fresh_initial, fresh_last = support.vllm_offline([initial, last / "hf"], tmp_path)
        gap = max(abs(a - b) for a, b in zip(fresh_initial[0]["prompt_logprobs"][1:],
                                             fresh_last[0]["prompt_logprobs"][1:]))
        assert gap > 1e-3, "training did not change the model: the comparison below could not fail"
        for prompt, want in zip(support.PROMPTS, fresh_last, strict=True):
            got = server.prompt_logprobs(prompt)
            worst = max(abs(a - b) for a, b in zip(got[1:], want["prompt_logprobs"][1:], strict=True))
            assert worst < support.TOLERANCE, f"served logprobs differ from a fresh load by {worst:.2e}"
    finally:
        server.stop()
