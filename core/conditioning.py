"""The `TUNELAB_COND` value: a prompt pair encoded for one pipe handle, ready for sampling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True, eq=False)
class Conditioning:
    prompt: str
    negative: str
    embeds: Any  # [batch, 77*k, D]
    negative_embeds: Any  # same shape as embeds (padded to equal length)
    pooled: Optional[Any]  # [batch, P] for SDXL, else None
    negative_pooled: Optional[Any]
    family: str  # family of the pipe that encoded it ("sdxl", "sdxl-refiner", "sd15", "ip2p", ...)
    loras: tuple = ()  # the handle's LoRA stack at encoding time (text-encoder LoRAs change embeddings)

    @property
    def batch(self) -> int:
        return int(self.embeds.shape[0])

    def diffusers_kwargs(self) -> dict:
        """Keyword arguments for a diffusers pipeline call."""
        kw = {"prompt_embeds": self.embeds, "negative_prompt_embeds": self.negative_embeds}
        if self.pooled is not None:
            kw["pooled_prompt_embeds"] = self.pooled
            kw["negative_pooled_prompt_embeds"] = self.negative_pooled
        return kw
