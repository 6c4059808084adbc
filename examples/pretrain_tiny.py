"""A tiny pretraining script on Megatron-LM's training loop (``megatron.training``: megatron-core >= 0.18's
wheel, or a Megatron-LM checkout), in the shape of Megatron-LM's pretrain_gpt.py: arguments parsed
with the script's own extra_args_provider, then ``pretrain``. A 2-layer Llama learns to count.

It has no CPU code of its own: on a machine without a GPU, run it in the launcher's CPU trial mode::

    megatron-trt-ext run --cpu examples/pretrain_tiny.py --save ckpt --save-interval 4 \\
        --export-recipe bf16 --export-dir exports

Flags given on the command line override DEFAULT_ARGV.
"""

import functools
import sys

import torch
from megatron.core.enums import ModelType
from megatron.training import get_args, get_tokenizer, pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args

DEFAULT_ARGV = """
--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention --num-query-groups 2
--ffn-hidden-size 128 --seq-length 32 --max-position-embeddings 64 --normalization RMSNorm --swiglu
--position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights
--attention-dropout 0 --hidden-dropout 0 --micro-batch-size 4 --global-batch-size 8 --train-iters 8
--lr 3e-3 --min-lr 3e-4 --lr-decay-style constant --clip-grad 0.0 --tokenizer-type NullTokenizer
--vocab-size 100 --eval-iters 0 --eval-interval 1000000 --log-interval 1 --seed 1234
""".split()


def add_own_args(parser):
    """The script's own extra_args_provider (as pretrain_gpt.py passes ModelOpt's): the launcher
    chains the --export-* flags after it."""
    parser.add_argument_group(title="pretrain_tiny").add_argument("--count-offset", type=int, default=1)
    return parser


class CountingDataset(torch.utils.data.Dataset):
    """Each token is the previous one plus --count-offset, over every id of the tokenizer."""

    def __init__(self, n, seq, vocab, seed, offset):
        self.n, self.seq, self.vocab, self.offset = n, seq, vocab, offset
        self.starts = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        tokens = (self.starts[i] + self.offset * torch.arange(self.seq + 1)) % self.vocab
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(self.seq),
                "position_ids": torch.arange(self.seq)}


def datasets_provider(num_samples):
    args = get_args()
    vocab = get_tokenizer().vocab_size
    return tuple(CountingDataset(max(int(n), 1), args.seq_length, vocab, args.seed + i, args.count_offset)
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


if __name__ == "__main__":  # guarded: Megatron's checkpoint writer spawns processes that import this file
    sys.argv = [sys.argv[0]] + DEFAULT_ARGV + sys.argv[1:]
    args = parse_and_validate_args(extra_args_provider=add_own_args)
    pretrain(pretrain_cfg_container_from_args(args, gpt_config_from_args(args)), datasets_provider,
             ModelType.encoder_or_decoder, forward_step)
