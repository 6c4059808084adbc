"""A tiny Llama trained with Megatron-Bridge's own loop (``pretrain`` with a ConfigContainer), exports
switched on by one callback: ``callbacks=[ExportCallback(...)]``.

    python tests/scripts/tiny_bridge_pretrain.py SAVE_DIR EXPORT_DIR TRAIN_ITERS [--resume] [--logits FILE]

Saves every 2 iterations (torch_dist), a non-persistent save every 3, exports every 2nd persistent
save in float32. ``--logits FILE`` saves the final model's logits on fixed tokens (test oracle).
Test code: loads the Bridge/CPU shims (tests.support).
"""

import functools
import sys
from dataclasses import dataclass

import torch

import os  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository: examples/, tests/support/
from tests.support.bridge_shim import install

install()  # at import: the checkpoint writer's spawned children re-import this file

import torch.nn.functional as F  # noqa: E402
from megatron.bridge.data.base import DatasetBuildContext, DatasetProvider  # noqa: E402
from megatron.bridge.models.gpt_provider import GPTModelProvider, local_layer_spec  # noqa: E402
from megatron.bridge.training.config import (  # noqa: E402
    CheckpointConfig, ConfigContainer, DistributedInitConfig, LoggerConfig, OptimizerConfig, RNGConfig,
    SchedulerConfig, TrainingConfig, ValidationConfig)
from megatron.bridge.training.pretrain import pretrain  # noqa: E402
from megatron.bridge.training.tokenizers.config import TokenizerConfig  # noqa: E402

from megatron_trt_ext.bridge import ExportCallback  # noqa: E402

SEQ, VOCAB = 32, 100
PROBE = torch.tensor([[97, 98, 99, 0, 1, 2, 3, 99, 5, 6]])


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.n = n
        self.starts = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        tokens = (self.starts[i] + torch.arange(SEQ + 1)) % VOCAB
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(SEQ),
                "position_ids": torch.arange(SEQ)}


@dataclass(kw_only=True)
class CountingDatasetProvider(DatasetProvider):
    seed: int = 1234

    def build_datasets(self, context: DatasetBuildContext):
        return tuple(CountingDataset(max(int(n), 1), self.seed + i) if n else None
                     for i, n in enumerate((context.train_samples, context.valid_samples, context.test_samples)))


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(state, data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(loss_func, batch["loss_mask"])


class FinalLogits:
    """Test oracle: the final model's logits on PROBE (the last save holds these weights)."""

    def __init__(self, path):
        self.path = path

    def on_train_end(self, context):
        chunk = context.model[0].module
        chunk.eval()
        with torch.no_grad():
            logits = chunk(PROBE, torch.arange(PROBE.shape[1]).unsqueeze(0), None)
        torch.save({"tokens": PROBE, "logits": logits.float()}, self.path)


def config(save_dir, train_iters, resume):
    model = GPTModelProvider(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        seq_length=SEQ, vocab_size=None, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        position_embedding_type="rope", add_bias_linear=False, share_embeddings_and_output_weights=False,
        attention_dropout=0.0, hidden_dropout=0.0, transformer_layer_spec=local_layer_spec)
    return ConfigContainer(
        model=model,
        train=TrainingConfig(train_iters=train_iters, micro_batch_size=4, global_batch_size=8),
        validation=ValidationConfig(eval_iters=0, eval_interval=None),
        optimizer=OptimizerConfig(optimizer="adam", lr=3e-3, min_lr=3e-4, clip_grad=0.0),
        scheduler=SchedulerConfig(lr_decay_style="constant", lr_warmup_iters=0, start_weight_decay=0.01,
                                  end_weight_decay=0.01, weight_decay_incr_style="constant",
                                  override_opt_param_scheduler=resume),
        dataset=CountingDatasetProvider(dataloader_type="single", num_workers=0),
        logger=LoggerConfig(log_interval=1),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB),
        checkpoint=CheckpointConfig(save=save_dir, save_interval=2, ckpt_format="torch_dist", async_save=False,
                                    non_persistent_save_interval=3, non_persistent_ckpt_type="global",
                                    load=save_dir if resume else None, load_rng=False),
        dist=DistributedInitConfig(distributed_backend="gloo"),
        rng=RNGConfig(seed=1234))


if __name__ == "__main__":
    save_dir, export_dir, train_iters = sys.argv[1], sys.argv[2], int(sys.argv[3])
    callbacks = [ExportCallback(output_dir=export_dir, every_n_saves=2, dtype="float32")]
    if "--logits" in sys.argv:
        callbacks.append(FinalLogits(sys.argv[sys.argv.index("--logits") + 1]))
    pretrain(config(save_dir, train_iters, "--resume" in sys.argv), forward_step, callbacks=callbacks)
