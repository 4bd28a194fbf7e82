"""What a step hands back: `StepResult` (tokens on the host) and `PendingSample` (a step's
tokens on their way to the host, so that the host can do other work before it waits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampler import SamplerOutput


@dataclass
class StepResult:
    """Sampled tokens of the sequences that reached their last known token this step; ``output``
    is on the host (one device->host copy per step)."""

    seq_ids: list[str]
    output: SamplerOutput | None

    def tokens(self) -> dict[str, list[int]]:
        """New tokens per sequence: one each today; a list so speculative decoding can add several."""
        if self.output is None:
            return {}
        return {seq_id: [tok] for seq_id, tok in zip(self.seq_ids, self.output.token_ids.tolist())}


class PendingSample:
    """A step's sampled tokens on their way to the host: tokens and logprobs in one copy
    (float64 holds both exactly), the top-N alternatives in a second only when asked for."""

    def __init__(self, seq_ids: list[str], out: SamplerOutput | None) -> None:
        self.seq_ids = seq_ids
        self._out = out
        self._event: torch.cuda.Event | None = None
        if out is None:
            return
        dev = out.token_ids.device
        pin = dev.type == "cuda"
        packed = torch.stack([out.token_ids.to(torch.float64), out.logprobs.to(torch.float64)])
        self._host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=pin)
        self._host.copy_(packed, non_blocking=pin)
        self._top: tuple[torch.Tensor, torch.Tensor] | None = None
        if out.top_ids is not None and out.top_logprobs is not None:
            ti = torch.empty(out.top_ids.shape, dtype=out.top_ids.dtype, pin_memory=pin)
            tl = torch.empty(out.top_logprobs.shape, dtype=out.top_logprobs.dtype, pin_memory=pin)
            ti.copy_(out.top_ids, non_blocking=pin)
            tl.copy_(out.top_logprobs, non_blocking=pin)
            self._top = (ti, tl)
        if pin:
            self._event = torch.cuda.Event()
            self._event.record()

    @property
    def device_tokens(self) -> torch.Tensor | None:
        return None if self._out is None else self._out.token_ids

    def wait(self) -> StepResult:
        if self._out is None:
            return StepResult([], None)
        if self._event is not None:
            self._event.synchronize()
        top_ids, top_lp = self._top if self._top is not None else (None, None)
        out = SamplerOutput(self._host[0].to(torch.int64), self._host[1].to(torch.float32), top_ids, top_lp)
        return StepResult(self.seq_ids, out)
