"""Training-only auxiliary supervision of the vision features (never saved with the model).

The language loss alone gives the vision encoder one token of signal per question; from scratch
it learnt colours quickly but stayed at chance on shape and left/right (mllama_tpu/tiny/README.md).
These small heads read the projected vision features (what the text's cross-attention sees) and
ask them to say, per patch, whether it is part of the shape, and, pooled over the shape's patches,
which shape it is and on which side. That builds exactly the features the cross-attention needs
to look up; the heads are dropped afterwards, the saved model is a plain Mllama.

Shape was still the weak answer with one pooled shape label per image, so
every patch on the shape's outline also names the shape on its own: the patch embedding learns
edge orientation and curvature locally, which then shows in the average over the shape's patches
that the text's cross-attention reads (no relational reasoning between patches needed).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import MllamaProcessor

from mllama_tpu.tiny.config import PATCH_SIZE
from mllama_tpu.tiny.data import Scene
from mllama_tpu.tiny.task import SHAPES, SIDES


@dataclass
class AuxTargets:
    patch_cover: torch.Tensor  # [T, P-1] fraction of each patch covered by the shape (CLS excluded)
    shape: int
    side: int


def _mask_image(scene: Scene) -> Image.Image:
    """White shape on black, same size and geometry as data.render draws it."""
    image = Image.new("RGB", (scene.width, scene.height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    cx, cy = scene.centre
    h = scene.size / 2
    if scene.shape == "square":
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=(255, 255, 255))
    elif scene.shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=(255, 255, 255))
    else:
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=(255, 255, 255))
    return image


def targets(processor: MllamaProcessor, scene: Scene) -> AuxTargets:
    """Per-patch shape coverage, found by sending the shape's mask through the same image
    processor (same resize, tiling and padding as the real image)."""
    ip = processor.image_processor
    out = ip(images=_mask_image(scene), return_tensors="np")
    pixels = out["pixel_values"][0, 0, :, 0]  # [T, S, S], channel 0 normalised
    unnorm = pixels * ip.image_std[0] + ip.image_mean[0]  # back to 0..1; padding -> 0
    tiles, size, _ = unnorm.shape
    patch = PATCH_SIZE
    grid = size // patch
    cover = unnorm.reshape(tiles, grid, patch, grid, patch).mean(axis=(2, 4)).reshape(tiles, grid * grid)
    # Padding tiles are all-zero *after* normalisation (they would read as 0.48 here): not shape.
    cover = cover * out["aspect_ratio_mask"][0, 0][:, None]
    return AuxTargets(torch.from_numpy(np.clip(cover, 0, 1)).float(), SHAPES.index(scene.shape), SIDES.index(scene.side))


class AuxHeads(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.patch = torch.nn.Linear(hidden, 1)
        self.shape = torch.nn.Linear(hidden, len(SHAPES))
        self.side = torch.nn.Linear(hidden, len(SIDES))
        self.outline_shape = torch.nn.Linear(hidden, len(SHAPES))

    def loss(
        self, features: torch.Tensor, aux: list[AuxTargets], tile_mask: torch.Tensor,
        outline_shape_weight: float = 1.0, shape_patches: str = "outline",
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """features [B, T, P, H] (projected vision states); tile_mask [B, T] (1 = real tile)."""
        patches = features[:, :, 1:]  # drop CLS
        cover = torch.stack([a.patch_cover for a in aux])  # [B, T, P-1]
        weight = tile_mask[:, :, None].float().expand_as(cover)
        logits = self.patch(patches).squeeze(-1)
        patch_loss = F.binary_cross_entropy_with_logits(logits, cover, weight=weight, reduction="sum") / weight.sum()
        pooled = (patches * cover[..., None]).sum(dim=(1, 2)) / cover.sum(dim=(1, 2))[:, None].clamp_min(1e-6)
        labels = torch.tensor([a.shape for a in aux])
        shape_loss = F.cross_entropy(self.shape(pooled), labels)
        side_loss = F.cross_entropy(self.side(pooled), torch.tensor([a.side for a in aux]))
        if shape_patches == "outline":
            # Edge patches (partly covered) carry the local evidence: straight axis-aligned edges
            # (square), slanted ones (triangle), curved ones (circle); 4c(1-c) peaks at half cover.
            covered = 4 * cover * (1 - cover) * weight  # [B, T, P-1]
        else:  # "covered": every patch the shape covers (> 10 %), by its cover
            covered = cover * weight * (cover > 0.1)
        per_patch = F.cross_entropy(
            self.outline_shape(patches).flatten(0, 2),
            labels[:, None, None].expand_as(cover).flatten(),
            reduction="none",
        )
        outline_shape_loss = (per_patch * covered.flatten()).sum() / covered.sum().clamp_min(1e-6)
        total = patch_loss + shape_loss + side_loss + outline_shape_weight * outline_shape_loss
        parts = {"patch": patch_loss, "shape": shape_loss, "side": side_loss, "outline_shape": outline_shape_loss}
        return total, {k: float(v.detach()) for k, v in parts.items()}
