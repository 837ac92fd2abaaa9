"""Writes a complete HF model directory (config, weights, tokenizer, processor) for the tiny model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import GenerationConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor

from mllama_tpu.tiny import tokenizer as tok
from mllama_tpu.tiny.config import MAX_TILES, TILE_SIZE, build_config


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_processor() -> MllamaProcessor:
    return pil_processor(tok.build_tokenizer(), TILE_SIZE, MAX_TILES)


def pil_processor(tokenizer, tile_size: int, max_tiles: int) -> MllamaProcessor:
    """Mllama's processor with the PIL image processor: the default (torchvision) one needs
    torchvision, which the project does not install; save_processor names this class in the
    saved configs so AutoProcessor picks it too."""
    image_processor = MllamaImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        max_image_tiles=max_tiles,
        image_mean=CLIP_MEAN,  # the normalisation Llama-3.2-Vision's processor uses
        image_std=CLIP_STD,
    )
    return MllamaProcessor(image_processor, tokenizer, chat_template=tok.CHAT_TEMPLATE)


def global_position_table(config, amplitude: float = 0.3) -> torch.Tensor:
    """[aspect_ratio_id, tile, patch, hidden] sin/cos code of each patch's position in the whole
    image (not just its tile), for every supported tile arrangement; CLS and padding tiles get 0.

    Why: the precomputed tile-position embedding can hold exactly this, but from a 0.02-std random
    start the model did not discover "where in the image" (left/right) within the time we have.
    """
    vision = config.vision_config
    grid = vision.image_size // vision.patch_size
    patches = grid * grid + 1
    hidden = vision.hidden_size
    freqs = torch.arange(1, hidden // 4 + 1, dtype=torch.float32) * math.pi / 2
    table = torch.zeros(len(vision.supported_aspect_ratios) + 1, vision.max_num_tiles, patches, hidden)
    for ratio_id, (rows, cols) in enumerate(vision.supported_aspect_ratios, start=1):
        for tile in range(rows * cols):
            r, c = divmod(tile, cols)  # the processor splits the canvas into tiles row by row
            for py in range(grid):
                for px in range(grid):
                    x = (c * grid + px + 0.5) / (cols * grid)
                    y = (r * grid + py + 0.5) / (rows * grid)
                    code = torch.cat([torch.sin(freqs * x), torch.cos(freqs * x), torch.sin(freqs * y), torch.cos(freqs * y)])
                    table[ratio_id, tile, 1 + py * grid + px] = amplitude * code
    return table


def new_model(seed: int, position_init: bool = True) -> MllamaForConditionalGeneration:
    """A randomly initialised model. Every tanh gate is set nonzero: transformers initialises them
    to 0, which would cut the image path and hide errors in it (export parity tests use this).
    position_init puts global_position_table into the tile-position embedding."""
    torch.manual_seed(seed)
    config = build_config()
    model = MllamaForConditionalGeneration(config)
    if position_init:
        embedding = model.model.vision_model.gated_positional_embedding.tile_embedding
        with torch.no_grad():
            embedding.weight.copy_(global_position_table(config).reshape(embedding.weight.shape))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate") or name.endswith("_gate") or ".gate_" in name:
                if param.numel() == 1:
                    param.copy_(torch.empty(1).uniform_(0.3, 0.7, generator=generator))
    return model.float()


def generation_config() -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tok.special_id(tok.BOS),
        eos_token_id=[tok.special_id(tok.EOT), tok.special_id(tok.EOM), tok.special_id(tok.EOS_TEXT)],
        pad_token_id=tok.special_id(tok.PAD),
        do_sample=False,
        max_new_tokens=32,
    )


def save_model_dir(model: MllamaForConditionalGeneration, out_dir: Path) -> None:
    """Everything AutoProcessor / from_pretrained need, offline; weights in float32 safetensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation_config()
    model.float().save_pretrained(str(out_dir), safe_serialization=True)
    save_processor(build_processor(), out_dir)


def save_processor(processor: MllamaProcessor, out_dir: Path) -> None:
    processor.save_pretrained(str(out_dir))
    # Also the standalone preprocessor_config.json that tools reading only the image processor
    # (and transformers 4.x) look for.
    processor.image_processor.save_pretrained(str(out_dir))
    # save_pretrained writes the torchvision class name, which AutoProcessor would try first;
    # name the PIL class so the same code runs wherever torchvision is or is not installed.
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = out_dir / name
        saved = json.loads(path.read_text())
        (saved[key] if key else saved)["image_processor_type"] = "MllamaImageProcessorPil"
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
