"""Turns a toy-task sample into the model's training tensors, through the real processor.

Training uses exactly what inference uses: the chat template, the processor's pixel_values,
aspect_ratio_ids/mask and cross_attention_mask. Labels cover only the assistant answers (each
answer's tokens and its closing <|eot_id|>); everything else is -100.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import MllamaProcessor

from mllama_tpu.tiny import tokenizer as tok
from mllama_tpu.tiny.data import Sample, messages_for, render

IGNORE = -100


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, IGNORE outside answers
    cross_attention_mask: torch.Tensor  # [L, 1, T] int64
    pixel_values: torch.Tensor  # [1, T, 3, S, S] float32
    aspect_ratio_ids: torch.Tensor  # [1] int64
    aspect_ratio_mask: torch.Tensor  # [1, T] int64


def assistant_header_ids(processor: MllamaProcessor) -> list[int]:
    """Ids of '<|start_header_id|>assistant<|end_header_id|>\\n\\n', which precede every answer."""
    text = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_labels(input_ids: list[int], header: list[int]) -> list[int]:
    """Labels = ids inside each assistant turn (after its header, through its <|eot_id|>)."""
    eot = tok.special_id(tok.EOT)
    labels = [IGNORE] * len(input_ids)
    i = 0
    while i <= len(input_ids) - len(header):
        if input_ids[i : i + len(header)] == header:
            j = i + len(header)
            while j < len(input_ids):
                labels[j] = input_ids[j]
                if input_ids[j] == eot:
                    break
                j += 1
            i = j + 1
        else:
            i += 1
    return labels


def encode(processor: MllamaProcessor, sample: Sample, header: list[int]) -> Encoded:
    """The whole conversation (all answers included), as the processor encodes it."""
    text = processor.apply_chat_template(messages_for(sample), add_generation_prompt=False)
    out = processor(images=render(sample.scene), text=text, add_special_tokens=False, return_tensors="pt")
    ids = out["input_ids"][0]
    return Encoded(
        input_ids=ids,
        labels=torch.tensor(answer_labels(ids.tolist(), header)),
        cross_attention_mask=out["cross_attention_mask"][0],
        pixel_values=out["pixel_values"][0],
        aspect_ratio_ids=out["aspect_ratio_ids"][0],
        aspect_ratio_mask=out["aspect_ratio_mask"][0],
    )


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads the text side; image tensors already have the fixed max-tiles shape."""
    length = max(len(e.input_ids) for e in batch)
    n = len(batch)
    tiles = batch[0].cross_attention_mask.shape[-1]
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    cross = torch.zeros((n, length, 1, tiles), dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        input_ids[i, :k] = e.input_ids
        attention_mask[i, :k] = 1
        labels[i, :k] = e.labels
        cross[i, :k] = e.cross_attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "cross_attention_mask": cross,
        "pixel_values": torch.stack([e.pixel_values for e in batch]),
        "aspect_ratio_ids": torch.stack([e.aspect_ratio_ids for e in batch]),
        "aspect_ratio_mask": torch.stack([e.aspect_ratio_mask for e in batch]),
    }
