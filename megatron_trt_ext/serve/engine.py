"""Our vLLM weight-transfer backend (`megatron_trt_ext`): runs inside each vLLM worker.

Imported only by vLLM (through `plugin.register`), so it may import vLLM at the top. The wire and
its checks are in `reader`/`wire`; this module is only what vLLM asks of a backend:

* `start_weight_update` puts the model into vLLM's layerwise reload (each layer's new weights are
  gathered while old ones keep their storage; a layer is processed and copied into place once
  all its weights have arrived), `finish_weight_update` finalizes it;
* `receive_weights` connects to every writer named in the update info and feeds each arriving
  batch (HF names, checkpoint format) to `model.load_weights`;
* a stream that breaks raises here, so vLLM's `/update_weights` fails and the client leaves the
  server paused (see `client`); the reload is finished first, so the next complete refit (which
  writes every layer) starts from a state vLLM can reload and makes the model whole again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.logger import init_logger

from . import reader

logger = init_logger(__name__)
BACKEND = "megatron_trt_ext"


@dataclass
class InitInfo(WeightTransferInitInfo):
    """Nothing to rendezvous: the writers' addresses come with each update."""

    timeout: float = 300.0


@dataclass
class UpdateInfo(WeightTransferUpdateInfo):
    """One refit: where the writers listen, the token they expect, the version being sent."""

    writers: list = field(default_factory=list)
    token: str = ""
    version: str = ""
    timeout: float = 0.0


class MegatronTrtExtEngine(WeightTransferEngine[InitInfo, UpdateInfo]):
    init_info_cls = InitInfo
    update_info_cls = UpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.timeout = InitInfo.timeout
        self.last: dict = {}

    def init_transfer_engine(self, init_info: InitInfo) -> None:
        self.timeout = float(init_info.timeout)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        # the base class synchronizes an accelerator, which a CPU worker does not have
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type != "cpu" and torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: UpdateInfo) -> None:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        if not update_info.token:
            raise ValueError(f"{BACKEND}: update_info needs the refit's token and its writers' addresses")

        def apply(batch: dict) -> None:
            self.model.load_weights(list(batch.items()))

        rank = int(getattr(self.parallel_config, "rank", 0) or 0)
        try:
            with disable_mtp_completeness_check():
                totals = reader.receive(list(update_info.writers), update_info.token, apply, rank=rank,
                                        timeout=update_info.timeout or self.timeout)
        except BaseException:
            # vLLM ends the update session when this raises, without finishing it: finish the
            # layerwise reload here, so the next refit starts from a model vLLM can reload (the
            # server stays paused; layers this stream did not complete hold no complete version)
            self.finish_weight_update()
            raise
        self.last = {"version": update_info.version, **totals}
        logger.info("%s: version %s, %d tensors (%.1f MB) from %d writers in %.2f s", BACKEND,
                    update_info.version, totals["tensors"], totals["bytes"] / 1e6, totals["writers"],
                    totals["seconds"])

    def shutdown(self) -> None:
        """No connection outlives a refit."""
