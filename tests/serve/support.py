"""Helpers of the vLLM suite: vLLM-sized tiny models, bf16 HF exports, transformers' greedy reference,
vLLM runs in a child process and a stock OpenAI server with our weight-transfer backend."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 120
PROMPTS = [[3, 17, 42, 5, 99, 64, 7, 21, 11], [100, 2, 0, 58, 33, 8]]
MAX_TOKENS = 6
TOLERANCE = 2e-4
# vLLM's CPU attention kernels want head_dim 64-like sizes
SHAPES = dict(hidden_size=256, num_attention_heads=4, num_query_groups=2, kv_channels=64, ffn_hidden_size=384)


def vllm_env() -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
               HF_HUB_OFFLINE="1", VLLM_SERVER_DEV_MODE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here: scripts/test-serve runs this suite in .venv-vllm",
                    allow_module_level=True)


def export_hf(model, out: Path, iteration: int = 1) -> Path:
    """The bf16 HF export (what users deploy) of ``model``; returns its hf/ directory."""
    from megatron_trt_ext import ExportConfig, Exporter

    config = ExportConfig(output_dir=str(out), formats=["hf"], dtype="bfloat16", vocab_size=VOCAB)
    return Exporter(model, config).export(iteration=iteration).path / "hf"


def transformers_greedy(hf_dir: Path) -> list:
    """transformers (float32) on the export: see `greedy`."""
    import transformers

    return greedy(transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval())


@torch.no_grad()
def greedy(model) -> list:
    """A plain greedy loop over the forward pass of a transformers model (generate() would mask
    prompt positions holding token 0), with the log-probabilities vLLM reports."""
    results = []
    for prompt in PROMPTS:
        ids = list(prompt)
        logprobs = []
        for _ in range(MAX_TOKENS):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            token = int(lp[-1].argmax())
            if len(ids) == len(prompt):
                prompt_lp = [None] + [float(lp[i - 1, prompt[i]]) for i in range(1, len(prompt))]
            logprobs.append(float(lp[-1, token]))
            ids.append(token)
        results.append({"tokens": ids[len(prompt):], "logprobs": logprobs, "prompt_logprobs": prompt_lp})
    return results


def vllm_offline(dirs: list, tmp: Path, **kwargs) -> list:
    """vLLM's results on each directory (one child process for all of them)."""
    spec = [{"dir": str(d), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "kwargs": kwargs} for d in dirs]
    path = tmp / "vllm_spec.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "tests.serve.vllm_run", str(path)], cwd=ROOT, env=vllm_env(),
                          capture_output=True, text=True, timeout=900)
    lines = [l for l in done.stdout.splitlines() if l.startswith("VLLM_RESULTS ")]
    assert done.returncode == 0 and lines, f"vLLM failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(lines[-1][len("VLLM_RESULTS "):])


def assert_same_outputs(got: list, want: list, what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["tokens"] == w["tokens"], f"{what}, prompt {i}: greedy tokens {g['tokens']} != {w['tokens']}"
        pairs = list(zip(g["logprobs"], w["logprobs"])) + list(zip(g["prompt_logprobs"][1:], w["prompt_logprobs"][1:]))
        worst = max(abs(a - b) for a, b in pairs)
        assert worst < TOLERANCE, f"{what}, prompt {i}: logprobs differ by {worst:.2e}"


# ---------------------------------------------------------------------- a stock OpenAI server
class Server:
    """``python -m vllm.entrypoints.openai.api_server`` (the `vllm` command is broken in vllm-cpu)
    on ``model_dir`` with our backend, started exactly as README tells users to."""

    def __init__(self, model_dir: Path, port: int, log: Path, dtype: str = "float32", extra: tuple = ()):
        self.model_dir, self.port, self.url = str(model_dir), port, f"http://127.0.0.1:{port}"
        self.log_path = log
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--enforce-eager",
               "--skip-tokenizer-init", "--max-model-len", "64",
               "--weight-transfer-config", '{"backend": "megatron_trt_ext"}', *extra]
        # from a directory without the repo's sources, so vLLM finds the installed plugin
        self.proc = subprocess.Popen(cmd, cwd=log.parent, env=vllm_env(), stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 600.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({self.proc.returncode}):\n{self.log()[-6000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return time.monotonic() - started
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"vLLM server not up in {timeout} s:\n{self.log()[-6000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def prompt_logprobs(self, prompt: list) -> list:
        """/v1/completions' prompt logprobs of ``prompt``'s own tokens (None for the first)."""
        body = json.dumps({"model": self.model_dir, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                           "prompt_logprobs": 1}).encode()
        request = urllib.request.Request(self.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            steps = json.load(response)["choices"][0]["prompt_logprobs"]
        return [None] + [step[str(tok)]["logprob"] for step, tok in zip(steps[1:], prompt[1:])]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(30)
