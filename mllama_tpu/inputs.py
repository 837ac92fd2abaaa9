"""What the model sees: (conversation, image) -> engine inputs, defined once for every engine.

The processor (transformers' AutoProcessor from a token_config dir) does everything it already
knows how to do: chat template, tokenization, tiling, resizing, normalisation, aspect-ratio ids
and the per-token cross-attention mask. This module keeps a prompt compactly (ids, the tiles
each token sees) and makes the static-shape arrays of the net contract per chunk:

- a chunk's ids padded to its step net's length with the pad id (pad rows are computed but
  never read or cached), positions offset.., and the self-attention mask over the cache slots
  filled so far plus the chunk itself, causally (a decode step is a chunk of one),
- the cross-attention mask [1,1,C,T*P]: token r sees tile t's P patch columns iff the
  processor says so; rows that see no tile get text_row_mask 0 and an all-visible (zeroed)
  mask row, which is exactly what transformers' `_prepare_cross_attention_mask` does,
- the decode-time cross row / text_row_mask: the last prompt token's, because transformers'
  generate repeats the last row of the cross-attention mask for every new token.

Nothing here assumes where <|image|> sits or how many tiles an image has.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mllama_tpu.contract import MASK_HIDDEN, MASK_VISIBLE
from mllama_tpu.errors import UserError



@dataclass
class ImageInputs:
    """One image, tiled by the processor: the `vit` net's inputs."""

    pixel_values: np.ndarray  # [T,3,S,S] f32, tiles beyond num_tiles are zero padding
    aspect_ratio_ids: np.ndarray  # [1,1] i32
    aspect_ratio_mask: np.ndarray  # [1,T] i32, 1 for real tiles

    @property
    def num_tiles(self) -> int:
        """Real tiles of this image (the rest of the T slots are padding)."""
        return int(self.aspect_ratio_mask.sum())

    @property
    def max_tiles(self) -> int:
        return int(self.aspect_ratio_mask.shape[-1])


@dataclass
class ChunkInputs:
    """`rows` tokens of a prompt from cache slot `offset`, at the static length `size` of a
    step net: what the net reads (self rows see the cache so far plus the chunk, causally)."""

    offset: int  # cache slot (= position) of the first token
    rows: int  # real tokens; rows..size-1 are padding (computed, never read, never cached)
    input_ids: np.ndarray  # [1,size] i32
    position_ids: np.ndarray  # [1,size] i32
    attention_mask: np.ndarray  # [1,1,size,SEQ+size] f32: the SEQ cache slots, then the chunk
    cross_attention_mask: np.ndarray | None = None  # [1,1,size,T*P] f32, image prompts only
    text_row_mask: np.ndarray | None = None  # [1,size,1] f32

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def has_image(self) -> bool:
        return self.cross_attention_mask is not None


def plan_chunks(num_tokens: int, start: int, lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """(offset, rows, size) of each chunk prefilling tokens start..num_tokens-1: the largest
    length while more remain than it holds, then the shortest that holds the rest."""
    if not 0 <= start < num_tokens:
        raise ValueError(f"prefill from token {start} of a prompt of {num_tokens}")
    lengths = sorted(lengths)
    out, offset = [], start
    while offset < num_tokens:
        left = num_tokens - offset
        size = lengths[-1] if left >= lengths[-1] else next(c for c in lengths if c >= left)
        rows = min(left, size)
        out.append((offset, rows, size))
        offset += rows
    return out


@dataclass
class PrefillInputs:
    """One prompt: its tokens and, for an image prompt, which tiles each token sees. The static
    shapes of the nets are made per chunk (`chunk`), and only for the tokens not yet cached."""

    input_ids: np.ndarray  # [L] i32
    seq_length: int  # SEQ of the engine (cache slots)
    pad_id: int
    # Image prompts only (None for text-only prompts: engines skip the cross-attention layers).
    tile_rows: np.ndarray | None = None  # [L,T] 0/1: tile t is visible to token r (the processor's)
    num_patches: int | None = None  # P

    @property
    def has_image(self) -> bool:
        return self.tile_rows is not None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def token_ids(self) -> list[int]:
        return [int(t) for t in self.input_ids]

    @property
    def row_keys(self) -> list[tuple]:
        """What a cached token's K/V depend on besides the tokens before it: its id and, in an
        image prompt, the tiles it sees (engines.cache compares these)."""
        return [(int(t), self._tiles_key(r)) for r, t in enumerate(self.input_ids)]

    def _tiles_key(self, row: int):
        return None if self.tile_rows is None else self.tile_rows[row].astype(np.int8).tobytes()

    def chunk(self, offset: int, rows: int, size: int) -> ChunkInputs:
        """Tokens offset..offset+rows-1 as a step net of length `size` sees them."""
        if not (0 <= offset and 1 <= rows <= size and offset + rows <= self.num_tokens):
            raise ValueError(f"chunk of {rows} tokens at {offset} (size {size}) is outside the prompt of {self.num_tokens}")
        seq = self.seq_length
        ids = np.full((1, size), self.pad_id, dtype=np.int32)
        ids[0, :rows] = self.input_ids[offset:offset + rows]
        # Pad rows repeat the last position: every position stays inside the rotary tables.
        positions = np.minimum(np.arange(offset, offset + size), offset + rows - 1).astype(np.int32)[None]
        c = ChunkInputs(offset, rows, ids, positions, chunk_self_mask(offset, rows, size, seq))
        if self.tile_rows is not None:
            tiles = np.zeros((size, self.tile_rows.shape[1]), dtype=np.int64)
            tiles[:rows] = self.tile_rows[offset:offset + rows]
            mask, row = cross_masks(tiles, self.num_patches)
            c.cross_attention_mask = mask[None, None]
            c.text_row_mask = row.reshape(1, size, 1)
        return c

    def chunks(self, start: int, lengths: Sequence[int]) -> list[ChunkInputs]:
        """Tokens start..L-1 as chunks of the step nets the engine has (plan_chunks)."""
        return [self.chunk(offset, rows, size)
                for offset, rows, size in plan_chunks(self.num_tokens, start, lengths)]

    @property
    def decode_cross_attention_mask(self) -> np.ndarray | None:
        """[1,1,1,T*P] of every decode step: the last prompt token's row, as transformers' generate."""
        if self.tile_rows is None:
            return None
        mask, _ = cross_masks(self.tile_rows[-1:], self.num_patches)
        return mask.reshape(1, 1, 1, -1)

    @property
    def decode_text_row_mask(self) -> np.ndarray | None:
        """[1,1,1] of every decode step."""
        if self.tile_rows is None:
            return None
        _, row = cross_masks(self.tile_rows[-1:], self.num_patches)
        return row.reshape(1, 1, 1)

    @property
    def decode_row_key(self):
        """row_keys' tile part of a decoded token (it sees what the last prompt token sees)."""
        return self._tiles_key(-1)


# ---------------------------------------------------------------------------------------------
# processor
# ---------------------------------------------------------------------------------------------


def load_processor(token_config: str | Path) -> Any:
    """transformers' processor (tokenizer + image processor + chat template) from a local dir."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(token_config), local_files_only=True)


def user_message(question: str, with_image: bool) -> dict:
    """A user turn in the chat template's structured format; the image goes before the text."""
    content: list[dict] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": question})
    return {"role": "user", "content": content}


def assistant_message(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def process(processor: Any, messages: Sequence[dict], image: Any | None) -> dict[str, np.ndarray]:
    """Run the processor on a conversation (and its image, if any) as Mllama expects it.

    Test-only: the processor's whole path, the reference that the runtime's own path (the image
    tiled once, `prepare_image` + `prompt_features`) is checked against.

    The chat template already writes <|begin_of_text|>, so the tokenizer must not add it again.
    Returns numpy arrays: input_ids [1,L], and for an image pixel_values [1,1,T,3,S,S],
    aspect_ratio_ids [1,1], aspect_ratio_mask [1,1,T], cross_attention_mask [1,L,1,T].
    """
    text = processor.apply_chat_template(list(messages), add_generation_prompt=True)
    images = [image] if image is not None else None
    out = processor(images=images, text=text, add_special_tokens=False, return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def image_inputs_from(features: dict[str, np.ndarray]) -> ImageInputs:
    """The vit inputs from processor output (batch 1, one image)."""
    pv = np.asarray(features["pixel_values"])
    if pv.ndim != 6 or pv.shape[0] != 1 or pv.shape[1] != 1:
        raise ValueError(f"expected pixel_values [1,1,T,3,S,S] for one image, got {list(pv.shape)}")
    return ImageInputs(
        pixel_values=np.ascontiguousarray(pv[0, 0], dtype=np.float32),
        aspect_ratio_ids=np.asarray(features["aspect_ratio_ids"], dtype=np.int32).reshape(1, 1),
        aspect_ratio_mask=np.asarray(features["aspect_ratio_mask"], dtype=np.int32).reshape(1, -1),
    )


def prepare_image(processor: Any, image: Any) -> ImageInputs:
    """Tile, resize and normalise one RGB image: the image processor runs once per image."""
    return image_inputs_from(processor.image_processor([[image]], return_tensors="np"))


def prompt_features(processor: Any, messages: Sequence[dict], image: ImageInputs | None) -> dict[str, np.ndarray]:
    """What `process` gives for a conversation, from an already prepared image: input_ids [1,L]
    and, with an image, cross_attention_mask [1,L,1,T], by transformers' own mask rule."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    text = processor.apply_chat_template(list(messages), add_generation_prompt=True)
    ids = list(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    out = {"input_ids": np.asarray([ids], dtype=np.int64)}
    if image is not None:
        sparse = [get_cross_attention_token_mask(ids, processor.image_token_id)]
        out["cross_attention_mask"] = convert_sparse_cross_attention_mask_to_dense(
            sparse, num_tiles=[[image.num_tiles]], max_num_tiles=image.max_tiles, length=len(ids))
    return out


def count_prompt_tokens(processor: Any, messages: Sequence[dict]) -> int:
    """Tokens of a conversation's prompt. The ids depend on the text alone (an image is one
    <|image|> token whatever its tiles), so no image, and no device, is needed."""
    return int(prompt_features(processor, messages, None)["input_ids"].shape[1])


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------


def chunk_self_mask(filled: int, rows: int, size: int, seq_length: int) -> np.ndarray:
    """[1,1,size,SEQ+size] additive self-attention mask of a step net.

    Columns 0..SEQ-1 are the cache (slots 0..filled-1 hold earlier tokens), columns SEQ.. the
    step's own tokens: row r sees the cache and chunk tokens 0..r. Pad rows (r >= rows) see
    the same as the last real row, so no row is all-hidden; they are never read. A decode
    step is the chunk of one: the filled slots and its own column.
    """
    r = np.arange(size)[:, None]
    col = np.arange(seq_length + size)[None, :]
    own = col - seq_length
    visible = (col < filled) | ((own >= 0) & (own <= np.minimum(r, rows - 1)))
    return np.where(visible, MASK_VISIBLE, MASK_HIDDEN).astype(np.float32)[None, None]


def decode_self_mask(position: int, seq_length: int) -> np.ndarray:
    """[1,1,1,SEQ+1] additive mask of a decode step at `position` (the rule the C++ engine applies)."""
    return chunk_self_mask(position, 1, 1, seq_length)


def cross_masks(
    token_tile_mask: np.ndarray, num_patches: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cross-attention masks from the processor's per-token tile mask.

    token_tile_mask: [rows, T] of 0/1 (processor's cross_attention_mask[0, :, 0, :]).
    Returns (mask [rows, T*P] additive f32, text_row_mask [rows] f32). Each tile becomes P
    columns; a row that sees no tile gets text_row_mask 0 and an all-zero mask row, as
    transformers does (its attention over all columns then only feeds a zeroed MLP branch).
    """
    tiles = np.asarray(token_tile_mask) != 0
    columns = np.repeat(tiles, num_patches, axis=1)  # tile t -> columns t*P .. t*P+P-1
    row_visible = tiles.any(axis=1)
    mask = np.where(columns, MASK_VISIBLE, MASK_HIDDEN).astype(np.float32)
    mask[~row_visible] = MASK_VISIBLE
    return mask, row_visible.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# prefill inputs
# ---------------------------------------------------------------------------------------------


class PromptTooLong(UserError, ValueError):
    """The prompt has more tokens than the engine's static sequence length."""

    def __init__(self, num_tokens: int, seq_length: int):
        super().__init__(f"the prompt has {num_tokens} tokens, the model's limit is {seq_length}")
        self.num_tokens = num_tokens
        self.seq_length = seq_length


def prefill_inputs(
    input_ids: Sequence[int] | np.ndarray,
    seq_length: int,
    pad_id: int,
    cross_attention_mask: np.ndarray | None = None,
    num_patches: int | None = None,
    max_tiles: int | None = None,
) -> PrefillInputs:
    """The prefill inputs of one prompt (its chunks make the static shapes).

    cross_attention_mask is the processor's [1,L,1,T] (None for a text-only prompt); num_patches
    (P, per tile incl. CLS) and max_tiles (T) are the engine's, checked against the processor's.
    """
    ids = np.asarray(input_ids).reshape(-1)
    n = int(ids.shape[0])
    if n == 0:
        raise ValueError("empty prompt")
    if n > seq_length:
        raise PromptTooLong(n, seq_length)

    p = PrefillInputs(input_ids=ids.astype(np.int32), seq_length=seq_length, pad_id=pad_id)
    if cross_attention_mask is None:
        return p

    cam = np.asarray(cross_attention_mask)
    if cam.ndim != 4 or cam.shape[0] != 1 or cam.shape[1] != n or cam.shape[2] != 1:
        raise ValueError(f"expected cross_attention_mask [1,{n},1,T] for one image, got {list(cam.shape)}")
    if num_patches is None or max_tiles is None:
        raise ValueError("num_patches and max_tiles are needed for an image prompt")
    if cam.shape[3] != max_tiles:
        raise ValueError(f"the processor tiles images into {cam.shape[3]} tiles, the model into {max_tiles}")
    p.tile_rows = (cam[0, :, 0, :] != 0).astype(np.int64)
    p.num_patches = num_patches
    return p


def pad_token_id(processor: Any) -> int:
    """The id prompts are padded with; any id works (pad rows are never read), pad is clearest."""
    tok = getattr(processor, "tokenizer", processor)
    pid = tok.pad_token_id
    if pid is None:
        pid = tok.eos_token_id
    return int(pid if pid is not None else 0)
