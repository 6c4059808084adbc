"""Logits of a saved Megatron-LM checkpoint against its Hugging Face export (test helper).

    python tests/scripts/compare_logits.py CKPT_DIR ITERATION HF_DIR

Loads the checkpoint with the offline exporter's loader (one CPU rank; torch_dist re-shards any
training layout), runs both models on tokens that include the tokenizer's last id (NullTokenizer's
EOD), prints ``RESULT {"max_abs": ..., "scale": ..., "vocab": ...}``.
"""

import json
import sys

import os  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository: examples/, tests/support/
from examples.cpu_shim import install_megatron_training

install_megatron_training()

import torch  # noqa: E402


def main(checkpoint: str, iteration: int, hf_dir: str) -> None:
    import transformers

    from megatron_trt_ext.offline import load_checkpoint_model

    chunks, args, _, _ = load_checkpoint_model(checkpoint, iteration, tp=1, pp=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    tokens = torch.tensor([[vocab - 3, vocab - 2, vocab - 1, 0, 1, 2, vocab - 1, 5, 6, 7, 8, vocab - 1]])
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    with torch.no_grad():
        megatron = chunks[0](tokens, positions, None).float()[..., :vocab]
        exported = hf(tokens).logits.float()
    print("RESULT " + json.dumps({"max_abs": float((megatron - exported).abs().max()),
                                  "scale": float(megatron.abs().max()), "vocab": vocab,
                                  "padded_vocab": int(args.padded_vocab_size)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
