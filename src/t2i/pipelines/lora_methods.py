"""`pipe.load_lora(...)`, `pipe.fuse_lora()` and friends: the `t2i.lora.inference` functions as pipeline methods,
shared by the SD pipeline and the Imagen cascade."""

from __future__ import annotations

from pathlib import Path


class LoraMethods:
    """Mixin: LoRA inference on `self` (see `t2i.lora.inference` for what each call does)."""

    def load_lora(
        self, path: str | Path, scale: float = 1.0, name: str | None = None, stage: int | None = None
    ) -> str:
        """Add a LoRA file (diffusers/PEFT or kohya-ss naming) at `scale`; returns its adapter name.

        Several LoRAs can be loaded, each with its own scale; their updates add up. In a cascade the LoRA goes on
        the stage it fits, or on `stage`.
        """
        from t2i.lora.inference import load_lora

        return load_lora(self, path, scale=scale, name=name, stage=stage)

    def set_lora_scale(self, name: str, scale: float) -> None:
        from t2i.lora.inference import set_lora_scale

        set_lora_scale(self, name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA, or all of them."""
        from t2i.lora.inference import unload_lora

        unload_lora(self, name)

    def fuse_lora(self) -> int:
        """Fold every loaded LoRA into the base weights (the originals are kept for `unfuse_lora`)."""
        from t2i.lora.inference import fuse_lora

        return fuse_lora(self)

    def unfuse_lora(self) -> int:
        """Restore the exact base weights saved by `fuse_lora`."""
        from t2i.lora.inference import unfuse_lora

        return unfuse_lora(self)
