"""A small Megatron-LM pretraining script on megatron.training (megatron-core >= 0.18): the shape of
Megatron-LM's pretrain_gpt.py (arguments parsed with the script's own extra_args_provider, then
``pretrain``), a tiny Llama, counting data that includes the tokenizer's EOD id, CPU-friendly flags.

    python tests/scripts/cpu_launch.py tests/scripts/tiny_pretrain.py --save CKPT --save-interval 2 \
        --export-dir EXPORTS --export-interval 2

Test code: it loads the CPU shim (tests.support) when CUDA is absent. Flags given on the
command line override DEFAULT_ARGV.
"""

import functools
import sys

import torch

import os  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository: examples/, tests/support/
from examples.cpu_shim import install_megatron_training

install_megatron_training()  # at import: the checkpoint writer's spawned children re-import this file

from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import get_args, get_tokenizer, pretrain  # noqa: E402
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402

DEFAULT_ARGV = """
--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2
--ffn-hidden-size 128 --seq-length 32 --max-position-embeddings 64 --normalization RMSNorm --swiglu
--position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights
--attention-dropout 0 --hidden-dropout 0 --micro-batch-size 4 --global-batch-size 8 --train-iters 8
--lr 3e-3 --min-lr 3e-4 --lr-decay-style constant --clip-grad 0.0 --tokenizer-type NullTokenizer
--vocab-size 100 --transformer-impl local --distributed-backend gloo --use-cpu-initialization
--no-gradient-accumulation-fusion --no-rope-fusion --no-persist-layer-norm --eval-iters 0
--eval-interval 1000000 --log-interval 1 --seed 1234 --no-load-rng --no-save-rng
""".split()


def add_modelopt_like_args(parser):
    """Stands in for Megatron-LM's add_modelopt_args: the script's own extra_args_provider, which
    the launcher must chain, not replace."""
    group = parser.add_argument_group(title="script's own flags")
    group.add_argument("--export-quant-cfg", type=str, default=None)
    return parser


class CountingDataset(torch.utils.data.Dataset):
    """Token t+1 follows t, over every id the tokenizer has (its EOD id included)."""

    def __init__(self, n, seq, vocab, seed):
        self.n, self.seq, self.vocab = n, seq, vocab
        self.starts = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        tokens = (self.starts[i] + torch.arange(self.seq + 1)) % self.vocab
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}


def datasets_provider(num_samples):
    args = get_args()
    vocab = get_tokenizer().vocab_size
    return tuple(CountingDataset(max(int(n), 1), args.seq_length, vocab, args.seed + i)
                 for i, n in enumerate(num_samples))


datasets_provider.is_distributed = True


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    batch = next(data_iterator) if data_iterator is not None else None
    if batch is None:  # a pipeline stage without data (only the first and last read it)
        batch = {"tokens": None, "labels": None, "loss_mask": torch.ones(1), "position_ids": None}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(loss_func, batch["loss_mask"])


if __name__ == "__main__":  # dist_checkpointing's writer spawns and re-imports this module
    sys.argv = [sys.argv[0]] + DEFAULT_ARGV + sys.argv[1:]
    args = parse_and_validate_args(extra_args_provider=add_modelopt_like_args)
    pretrain(pretrain_cfg_container_from_args(args, gpt_config_from_args(args)), datasets_provider,
             ModelType.encoder_or_decoder, forward_step)
