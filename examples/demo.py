"""The main job: train a tiny Megatron-Core Llama with export switched on, then use the export.

It learns to count (each token is the previous one plus one, modulo the vocabulary), saves with
``megatron.core.dist_checkpointing.save`` every K steps while `attach` exports each save, and at the
end loads the newest Hugging Face export with transformers and generates from a prompt.

    python -m examples.demo [--steps 300] [--save-every 100] [--recipe recipes/bf16.yaml]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

VOCAB = 100          # real tokenizer size; Megatron pads the table to PADDED_VOCAB
PADDED_VOCAB = 128


def parse_args(argv=None):
    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--recipe", default=str(here / "recipes" / "bf16.yaml"))
    p.add_argument("--workdir", default="demo_run", help="checkpoints and exports go here (wiped first)")
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    return p.parse_args(argv)


def counting_batch(batch: int, seq: int, gen: torch.Generator):
    start = torch.randint(0, VOCAB, (batch, 1), generator=gen)
    tokens = (start + torch.arange(seq + 1)) % VOCAB
    return tokens[:, :-1], tokens[:, 1:]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Megatron warns at import that Apex/Transformer Engine are absent: expected on CPU.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    from examples.cpu_shim import stub_triton_only_modules

    stub_triton_only_modules()  # before megatron.core: newer versions import a Triton-only module
    from megatron.core import dist_checkpointing

    from megatron_trt_ext import ExportConfig, attach
    from megatron_trt_ext.manifest import latest_export, read_manifest, verify_export
    from examples.tiny_model import init_single_process, tiny_llama

    init_single_process(seed=1234)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "checkpoints").mkdir(parents=True)

    model = tiny_llama(vocab_size=PADDED_VOCAB, max_seq=64, num_layers=2, hidden_size=64,
                       num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128).to(device)
    config = ExportConfig.from_yaml(args.recipe, output_dir=str(work / "exports"), vocab_size=VOCAB)
    handle = attach(model, config)
    print(f"export attached: recipe={args.recipe} formats={config.formats} dtype={config.dtype} "
          f"every_n_saves={config.every_n_saves}")

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(args.seq_len, device=device).unsqueeze(0)
    t_start = time.time()
    for step in range(1, args.steps + 1):
        tokens, labels = (t.to(device) for t in counting_batch(args.batch, args.seq_len, gen))
        loss = model(tokens, positions.expand_as(tokens), attention_mask=None, labels=labels).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
        if step % args.save_every == 0 or step == args.steps:
            ckpt = work / "checkpoints" / f"iter_{step:07d}"
            ckpt.mkdir(parents=True, exist_ok=True)
            dist_checkpointing.save(model.sharded_state_dict(), str(ckpt))
            r = handle.last_result
            if r is not None and r.iteration == step:
                print(f"  saved {ckpt.name}; export {r.status} (training waited "
                      f"{r.timings.get('stall_s', 0) * 1000:.1f} ms)")
    handle.detach()  # waits for the export still running in the background
    train_s = time.time() - t_start

    export = latest_export(work / "exports")
    if export is None:
        print("FAILED: no complete export found")
        return 1
    print(f"\ntrained {args.steps} steps in {train_s:.1f} s\n")
    print(f"{'iteration':>9}  {'stall ms':>8}  {'seconds':>7}  {'bytes':>9}  {'verified':>8}  path")
    stalls = []
    for path in sorted((work / "exports").glob("iter_*")):
        m = read_manifest(path)
        t = m["timings"]
        problems = verify_export(path)
        stalls.append(t.get("stall_s", 0))
        print(f"{m['iteration']:>9}  {t.get('stall_s', 0) * 1000:>8.1f}  {t['total_s']:>7.2f}  "
              f"{m['bytes_written']:>9}  {'yes' if not problems else 'NO':>8}  {path}")
        if problems:
            print(f"FAILED: {path} does not match its manifest: {problems[:3]}")
            return 1
    from megatron_trt_ext import Exporter

    sync = Exporter(model, ExportConfig.from_yaml(args.recipe, output_dir=str(work / "sync_exports"),
                                                  vocab_size=VOCAB, mode="sync")).export(args.steps)
    print(f"\nthe same export in sync mode stalls training {sync.timings['stall_s'] * 1000:.1f} ms; the async "
          f"exports above stalled it {max(stalls) * 1000:.1f} ms at most")

    from megatron_trt_ext.quant.dequant import load_dequantized

    hf = load_dequantized(export / "hf")  # plain from_pretrained, or dequantized for quantized recipes
    prompt = torch.tensor([[37, 38, 39, 40, 41]])
    want = [(42 + i) % VOCAB for i in range(10)]
    out = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    got = out[0, prompt.shape[1]:].tolist()
    print(f"\ntransformers on {export / 'hf'}:\n  prompt    {prompt[0].tolist()}\n  generated {got}\n"
          f"  expected  {want}")
    if got != want:
        print("FAILED: the exported model does not continue the count")
        return 1
    print("OK: the exported Hugging Face model generates what the Megatron model learned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
