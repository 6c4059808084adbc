"""Issue 19's bench: how long a running vLLM server takes to serve a new save, three ways, measured
side by side in one run on each model (a tiny Llama and a ~125M Llama-shaped one):

* **refit**: the save's export run with ``serve:`` only (no file written): the converted HF tensors
  stream from this process into the running server through our weight-transfer backend (pause keep,
  stream, version, resume); also the bare client (`serve.client.refit`) on tensors already in
  memory, which is the transport and vLLM's loading without the conversion;
* **export + restart**: write the HF export, stop the server, start a fresh one on the export,
  until ``/health`` answers and one completion returns (what a job does without a live refit);
* **vLLM reload**: vLLM's own in-place reload from the export on disk, over HTTP
  (``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}``, dev
  mode), the export's writing not included.

Bytes/s of the refit's stream (the ``/update_weights`` step) beside a raw loopback TCP copy of the
same number of bytes (this process to itself, 4 MiB sends): the host link it runs over. Every
served answer is checked: after each way the server must give the new save's prompt log-probs.

Runs in the vLLM environment (``scripts/test-serve`` creates ``.venv-vllm``):

    .venv-vllm/bin/python -m bench.refit [--models tiny,125m] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

MODELS = {
    # name: tiny_llama keywords (vLLM's CPU kernels want head_dim 64)
    "tiny": dict(num_layers=2, hidden_size=256, num_attention_heads=4, num_query_groups=2, kv_channels=64,
                 ffn_hidden_size=384, vocab_size=1024),
    "125m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, num_query_groups=4, kv_channels=64,
                 ffn_hidden_size=2048, vocab_size=32000),
}
PROMPT = [3, 17, 42, 5, 99, 64, 7, 21, 11]


def loopback_copy(nbytes: int, chunk: int = 4 << 20) -> float:
    """Seconds to send ``nbytes`` over a loopback TCP connection (sender thread, receiver here)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    payload = memoryview(bytearray(chunk))

    def send():
        with socket.create_connection(("127.0.0.1", port)) as s:
            left = nbytes
            while left > 0:
                n = min(left, chunk)
                s.sendall(payload[:n])
                left -= n

    thread = threading.Thread(target=send)
    started = time.perf_counter()
    thread.start()
    conn, _ = server.accept()
    buf = bytearray(chunk)
    got = 0
    with conn:
        while got < nbytes:
            n = conn.recv_into(buf)
            if not n:
                break
            got += n
    thread.join()
    server.close()
    return time.perf_counter() - started


def post(url: str, path: str, body: dict, timeout: float = 600) -> dict:
    import urllib.request

    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode() or "{}"
    return json.loads(text)


def worst_gap(got: list, want: list) -> float:
    return max(abs(a - b) for a, b in zip(got[1:], want[1:], strict=True))


def bench_model(name: str, shape: dict, work: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    from megatron_trt_ext import ExportConfig, Exporter
    from megatron_trt_ext.serve.client import refit
    from megatron_trt_ext.utils import free_port
    from tests.serve import support
    from tests.support.models import randomize, tiny_llama

    vocab = shape["vocab_size"]
    model = tiny_llama(**{k: v for k, v in shape.items() if k != "vocab_size"}, vocab_size=vocab,
                       params_dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())

    def export_hf(iteration: int) -> tuple:
        cfg = ExportConfig(output_dir=str(work / "exports"), formats=["hf"], dtype="bfloat16", vocab_size=vocab,
                           mode="sync")
        started = time.perf_counter()
        path = Exporter(model, cfg).export(iteration=iteration).path / "hf"
        return path, time.perf_counter() - started

    randomize(model, seed=1)
    dir_a, _ = export_hf(1)
    server = support.Server(dir_a, free_port(), work / f"server-{name}-a.log")
    fig: dict = {"model": name, "params": params}
    try:
        fig["first_start_s"] = server.wait_ready()
        want_a = server.prompt_logprobs(PROMPT)

        # (a) refit: a save's export run with serve only, then the bare client on in-memory tensors
        randomize(model, seed=2)
        cfg = ExportConfig(output_dir=str(work / "refits"), formats=[], dtype="bfloat16", vocab_size=vocab,
                           mode="sync", serve={"url": server.url, "timeout_s": 300})
        record = Exporter(model, cfg).export(iteration=2).serve
        assert record and record["status"] == "complete", record
        fig["refit_export_run_s"] = record["seconds"]
        served_b = server.prompt_logprobs(PROMPT)

        # (b) export + restart on the same weights: the reference for (a)'s answer
        dir_b, fig["export_write_s"] = export_hf(2)
        tensors = list(load_file(str(dir_b / "model.safetensors")).items())
        result = refit(server.url, iter(tensors), 3)
        fig["refit_client_s"] = result.seconds
        fig["refit_stream_s"] = result.steps["update_weights"]
        fig["refit_bytes"] = result.bytes
        fig["loopback_s"] = loopback_copy(result.bytes)

        # (c) vLLM's own reload from disk, back to A and then to B
        started = time.perf_counter()
        post(server.url, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(dir_a)}})
        fig["vllm_reload_s"] = time.perf_counter() - started
        fig["gap_reload_a"] = worst_gap(server.prompt_logprobs(PROMPT), want_a)
        post(server.url, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(dir_b)}})

        started = time.perf_counter()
        server.stop()
        fig["stop_s"] = time.perf_counter() - started
        started = time.perf_counter()
        server = support.Server(dir_b, free_port(), work / f"server-{name}-b.log")
        server.wait_ready()
        fresh_b = server.prompt_logprobs(PROMPT)  # the one completion
        fig["restart_s"] = time.perf_counter() - started
        fig["export_restart_s"] = fig["export_write_s"] + fig["stop_s"] + fig["restart_s"]
        fig["gap_refit_vs_fresh"] = worst_gap(served_b, fresh_b)
        fig["gap_a_vs_b"] = worst_gap(want_a, fresh_b)  # the refit changed something measurable
    finally:
        server.stop()
    return fig


def table(figs: list) -> str:
    mb = lambda f: f["refit_bytes"] / 1e6  # noqa: E731
    rows = [("model", "params", "refit (export run)", "refit (client)", "export + restart", "vLLM reload",
             "stream MB/s", "loopback MB/s", "refit vs fresh")]
    for f in figs:
        rows.append((f["model"], f"{f['params'] / 1e6:.1f}M", f"{f['refit_export_run_s']:.2f} s",
                     f"{f['refit_client_s']:.2f} s",
                     f"{f['export_restart_s']:.1f} s ({f['export_write_s']:.1f} + {f['stop_s']:.1f} + "
                     f"{f['restart_s']:.1f})", f"{f['vllm_reload_s']:.2f} s",
                     f"{mb(f) / f['refit_stream_s']:.0f}", f"{mb(f) / f['loopback_s']:.0f}",
                     f"{f['gap_refit_vs_fresh']:.1e}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,125m")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("bench.refit needs vLLM: run it with .venv-vllm/bin/python (scripts/test-serve creates it)")
        return 2
    for key, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                       ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    from examples.cpu_shim import stub_triton_only_modules

    stub_triton_only_modules()
    from tests.support.models import init_single_process

    init_single_process()
    work = Path(tempfile.mkdtemp(prefix="mte-bench-refit-"))
    figs = []
    try:
        for name in args.models.split(","):
            started = time.perf_counter()
            figs.append(bench_model(name, MODELS[name], work / name))
            print(f"[{name}] {time.perf_counter() - started:.0f} s: " + json.dumps(figs[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core CPU, vLLM {vllm.__version__}, server float32 eager")
    print(table(figs))
    bad = [f["model"] for f in figs if f["gap_refit_vs_fresh"] >= 2e-4 or f["gap_reload_a"] >= 2e-4
           or f["gap_a_vs_b"] < 1e-3]
    if bad:
        print(f"FAILED: the refitted server does not answer as a fresh load on {bad}")
    if args.json:
        Path(args.json).write_text(json.dumps(figs, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
