"""The verification probe's pipeline path needs no CUDA: on a CPU gloo world with no CPU shim
installed (nothing in torch.cuda patched), two pipeline stages (and two virtual stages each) hand
their activations on and rank 0 records the top-k logits of the whole model.

Megatron's own transformer layers still ask CUDA for buffers on CPU (RoPE, the local attention's
memory buffer), so the stages here are small stand-ins with Megatron's stage interface
(``pre_process``, ``post_process``, ``set_input_tensor``, activations [seq, batch, hidden]); what
is under test is the probe's path through the stages, not Megatron's layers."""

import pytest
import torch
from megatron.core.enums import ModelType

from tests.support.distributed import run_ranks

VOCAB, HIDDEN = 48, 16


class Stage(torch.nn.Module):
    """Global stage ``index`` of ``count``: embedding on the first, output layer on the last."""

    def __init__(self, index: int, count: int, config=None):
        super().__init__()
        self.config = config  # what Megatron's schedule reads (pipeline dtype, sizes)
        self.model_type = ModelType.encoder_or_decoder
        gen = torch.Generator().manual_seed(100 + index)
        self.pre_process, self.post_process = index == 0, index == count - 1
        self.embedding = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=gen)) if self.pre_process else None
        self.layer = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN ** 0.5)
        self.output = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, generator=gen)) if self.post_process else None
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, tokens, positions, attention_mask=None):
        hidden = self.embedding[tokens].transpose(0, 1) if self.pre_process else self.input_tensor
        hidden = torch.tanh(hidden @ self.layer + positions.transpose(0, 1).unsqueeze(-1) * 0.01)
        return (hidden @ self.output.T).transpose(0, 1) if self.post_process else hidden


def reference_logits(tokens: torch.Tensor, count: int) -> torch.Tensor:
    stages = [Stage(i, count) for i in range(count)]
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    out = None
    for stage in stages:
        stage.set_input_tensor(out)
        out = stage(tokens, positions)
    return out


def probe_through_stages(rank: int, world_size: int, vpp: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    from megatron_trt_ext.gather import Comm
    from megatron_trt_ext.verification.probe import run_probe, synthetic_tokens
    from megatron_trt_ext.verification.spec import VerificationOptions

    assert not torch.cuda.is_available() and torch.cuda.current_device.__module__ == "torch.cuda"  # no shim
    ps.initialize_model_parallel(1, world_size, vpp if vpp > 1 else None)
    count = world_size * vpp
    config = TransformerConfig(num_layers=count, hidden_size=HIDDEN, num_attention_heads=4,
                               pipeline_model_parallel_size=world_size, pipeline_dtype=torch.float32)
    chunks = [Stage(v * world_size + rank, count, config) for v in range(vpp)]
    options = VerificationOptions(num_sequences=3, seq_len=8, top_k=4)
    record = run_probe(chunks, options, VOCAB, VOCAB, Comm(60, torch.device("cpu")), "float32")
    if rank != 0:
        return {}
    if not record.ok:
        return {"error": record.meta.get("error")}
    from safetensors.torch import load

    got = load(record.data)
    expected = torch.topk(reference_logits(synthetic_tokens(options, VOCAB), count), 4, dim=-1)
    return {"tokens_equal": torch.equal(got["tokens"], synthetic_tokens(options, VOCAB)),
            "values_close": torch.allclose(got["topk_values"], expected.values, rtol=1e-5, atol=1e-6),
            "ids_equal": torch.equal(got["topk_ids"], expected.indices)}


@pytest.mark.parametrize("vpp", [1, 2])
def test_the_probe_runs_through_pipeline_stages_on_cpu_without_the_shim(vpp):
    if torch.cuda.is_available():
        pytest.skip("covers machines without CUDA")
    outcome = run_ranks(2, "tests.test_probe_pipeline:probe_through_stages", timeout_s=120, cpu_shim=False, vpp=vpp)
    for rank, (status, value) in outcome.items():
        assert status == "ok", f"rank {rank}: {status} {value}"
    assert outcome[0][1] == {"tokens_equal": True, "values_close": True, "ids_equal": True}
