"""Random-weight Mllama checkpoints of any size, written shard by shard.

Used by tests and benchmarks where no real weights exist (no hub here): a tiny config for
parity tests, and the real 11B / 90B dims at reduced depth for shape and memory checks.
Tensors are generated one at a time and flushed in shards (HF hub naming, with a
`model.safetensors.index.json`), so writing an 11B-wide checkpoint needs about one shard
of RAM, not the whole model. Gates are nonzero so every path of the model matters.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" (std 0.02), "norm" (1 + noise), "gate" (gate angle), "bias" (small), "pos" (std 0.1)


def tiny_config(text_layers: int = 4, cross_layers: tuple[int, ...] = (1, 3), vocab_size: int = 320,
                image_size: int = 56, patch_size: int = 14, special_ids: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """A few-kB Mllama config with every feature of the real one (GQA, llama3 rope, gated vision).

    special_ids: eos_token_id (list), bos_token_id, pad_token_id, image_token_index; by default
    the last ids of the vocabulary, and the image token one past it."""
    ids = {"eos_token_id": [vocab_size - 1], "bos_token_id": vocab_size - 2, "pad_token_id": vocab_size - 3,
           "image_token_index": vocab_size, **(special_ids or {})}
    vision_hidden, n_inter = 32, 2
    return _mllama_config(
        text=dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=text_layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, cross_attention_layers=list(cross_layers),
                  max_position_embeddings=2048, eos_token_id=ids["eos_token_id"], bos_token_id=ids["bos_token_id"],
                  pad_token_id=ids["pad_token_id"],
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
        vision=dict(hidden_size=vision_hidden, num_hidden_layers=3, num_global_layers=2, attention_heads=2,
                    intermediate_size=64, image_size=image_size, patch_size=patch_size, max_num_tiles=4,
                    intermediate_layers_indices=[0, 2][:n_inter], vision_output_dim=vision_hidden * (1 + n_inter)),
        image_token_index=ids["image_token_index"],
    )


def full_config(kind: str = "11b", text_layers: int | None = None, cross_layers: list[int] | None = None,
                vision_layers: int | None = None, global_layers: int | None = None,
                vocab_size: int = 128256) -> dict[str, Any]:
    """Real Llama-3.2-Vision 11B / 90B dims; depth (and vocab) may be reduced for tests."""
    if kind == "11b":
        text = dict(hidden_size=4096, num_attention_heads=32, intermediate_size=14336, num_hidden_layers=40,
                    cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38])
    elif kind == "90b":
        text = dict(hidden_size=8192, num_attention_heads=64, intermediate_size=28672, num_hidden_layers=100,
                    cross_attention_layers=list(range(3, 100, 5)))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
        text["cross_attention_layers"] = list(cross_layers or [])
    n_local = vision_layers if vision_layers is not None else 32
    indices = [3, 7, 15, 23, 30] if n_local == 32 else [min(i, n_local - 1) for i in [3, 7, 15, 23, 30]]
    vision = dict(hidden_size=1280, num_hidden_layers=n_local,
                  num_global_layers=global_layers if global_layers is not None else 8, attention_heads=16,
                  intermediate_size=5120, image_size=560, patch_size=14, max_num_tiles=4,
                  intermediate_layers_indices=indices, vision_output_dim=7680)
    text.update(vocab_size=vocab_size, num_key_value_heads=8, max_position_embeddings=131072,
                eos_token_id=[128001, 128008, 128009], bos_token_id=128000, pad_token_id=128004,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    return _mllama_config(text=text, vision=vision, image_token_index=128256)


def _mllama_config(text: dict[str, Any], vision: dict[str, Any], image_token_index: int) -> dict[str, Any]:
    text = {"model_type": "mllama_text_model", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "hidden_act": "silu", "tie_word_embeddings": False, **text}
    vision = {"model_type": "mllama_vision_model", "num_channels": 3, "norm_eps": 1e-5, "hidden_act": "gelu",
              "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
              **vision}
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "image_token_index": image_token_index, "text_config": text, "vision_config": vision,
            "torch_dtype": "float32"}


def tensor_specs(cfg: dict[str, Any]) -> Iterator[TensorSpec]:
    """Every tensor of an MllamaForConditionalGeneration checkpoint, in HF hub naming."""
    t, v = cfg["text_config"], cfg["vision_config"]
    h, heads, kv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
    d, ff = h // heads, t["intermediate_size"]
    yield TensorSpec("language_model.model.embed_tokens.weight", (t["vocab_size"] + 8, h), "normal")
    for i in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        attn = "cross_attn" if i in t["cross_attention_layers"] else "self_attn"
        yield TensorSpec(p + f"{attn}.q_proj.weight", (heads * d, h), "normal")
        yield TensorSpec(p + f"{attn}.k_proj.weight", (kv * d, h), "normal")
        yield TensorSpec(p + f"{attn}.v_proj.weight", (kv * d, h), "normal")
        yield TensorSpec(p + f"{attn}.o_proj.weight", (h, heads * d), "normal")
        if attn == "cross_attn":
            yield TensorSpec(p + "cross_attn.q_norm.weight", (d,), "norm")
            yield TensorSpec(p + "cross_attn.k_norm.weight", (d,), "norm")
            yield TensorSpec(p + "cross_attn_attn_gate", (1,), "gate")
            yield TensorSpec(p + "cross_attn_mlp_gate", (1,), "gate")
        yield TensorSpec(p + "mlp.gate_proj.weight", (ff, h), "normal")
        yield TensorSpec(p + "mlp.up_proj.weight", (ff, h), "normal")
        yield TensorSpec(p + "mlp.down_proj.weight", (h, ff), "normal")
        yield TensorSpec(p + "input_layernorm.weight", (h,), "norm")
        yield TensorSpec(p + "post_attention_layernorm.weight", (h,), "norm")
    yield TensorSpec("language_model.model.norm.weight", (h,), "norm")
    yield TensorSpec("language_model.lm_head.weight", (t["vocab_size"], h), "normal")

    c, tiles, n_ar = v["hidden_size"], v["max_num_tiles"], len(v["supported_aspect_ratios"]) + 1
    patches = (v["image_size"] // v["patch_size"]) ** 2 + 1
    yield TensorSpec("vision_model.patch_embedding.weight", (c, v["num_channels"], v["patch_size"], v["patch_size"]),
                     "normal")
    yield TensorSpec("vision_model.class_embedding", (c,), "pos")
    yield TensorSpec("vision_model.gated_positional_embedding.embedding", (patches, c), "pos")
    yield TensorSpec("vision_model.gated_positional_embedding.gate", (1,), "gate")
    yield TensorSpec("vision_model.gated_positional_embedding.tile_embedding.weight", (n_ar, tiles * patches * c),
                     "pos")
    for which in ("pre", "post"):
        yield TensorSpec(f"vision_model.{which}_tile_positional_embedding.embedding.weight", (n_ar, tiles * c), "pos")
        yield TensorSpec(f"vision_model.{which}_tile_positional_embedding.gate", (1,), "gate")
    for ln in ("layernorm_pre", "layernorm_post"):
        yield TensorSpec(f"vision_model.{ln}.weight", (c,), "norm")
        yield TensorSpec(f"vision_model.{ln}.bias", (c,), "bias")
    for enc, n, gated in (("transformer", v["num_hidden_layers"], False),
                          ("global_transformer", v["num_global_layers"], True)):
        for i in range(n):
            p = f"vision_model.{enc}.layers.{i}."
            for proj in ("q", "k", "v", "o"):
                yield TensorSpec(p + f"self_attn.{proj}_proj.weight", (c, c), "normal")
            yield TensorSpec(p + "mlp.fc1.weight", (v["intermediate_size"], c), "normal")
            yield TensorSpec(p + "mlp.fc1.bias", (v["intermediate_size"],), "bias")
            yield TensorSpec(p + "mlp.fc2.weight", (c, v["intermediate_size"]), "normal")
            yield TensorSpec(p + "mlp.fc2.bias", (c,), "bias")
            for ln in ("input_layernorm", "post_attention_layernorm"):
                yield TensorSpec(p + f"{ln}.weight", (c,), "norm")
                yield TensorSpec(p + f"{ln}.bias", (c,), "bias")
            if gated:
                yield TensorSpec(p + "gate_attn", (1,), "gate")
                yield TensorSpec(p + "gate_ffn", (1,), "gate")
    yield TensorSpec("multi_modal_projector.weight", (t["hidden_size"], v["vision_output_dim"]), "normal")
    yield TensorSpec("multi_modal_projector.bias", (t["hidden_size"],), "bias")


def _random(spec: TensorSpec, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Uniform values with the std each kind needs, drawn in place in the target dtype
    (uniform is the fastest generator; no f32 temporary for GB-sized bf16 tensors)."""
    x = torch.empty(spec.shape, dtype=dtype)
    if spec.init == "gate":
        return x.uniform_(0.4, 0.6, generator=gen)  # clearly nonzero: a zero gate hides its branch
    std = {"normal": 0.02 if len(spec.shape) < 2 else min(0.02, spec.shape[-1] ** -0.5),
           "norm": 0.1, "bias": 0.02, "pos": 0.1}[spec.init]
    a = std * 3 ** 0.5  # uniform(-a, a) has standard deviation `std`
    x.uniform_(-a, a, generator=gen)
    return x.add_(1.0) if spec.init == "norm" else x


def write_random_checkpoint(out_dir: str | Path, cfg: dict[str, Any], dtype: torch.dtype = torch.float32,
                            seed: int = 0, shard_bytes: int = 1 << 30) -> Path:
    """Write config.json + sharded safetensors (+ index) of random weights; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, int] = {}

    def flush() -> None:
        idx = len(shards)
        save_file(shards[-1], str(out / f"part-{idx:05d}.safetensors"), metadata={"format": "pt"})
        for name in shards[-1]:
            weight_map[name] = idx
        shards[-1] = {}  # drop the tensors: memory stays about one shard
        shards.append({})

    for spec in tensor_specs(cfg):
        tensor = _random(spec, gen, dtype)
        if size and size + tensor.numel() * tensor.element_size() > shard_bytes:
            flush()
            size = 0
        shards[-1][spec.name] = tensor
        size += tensor.numel() * tensor.element_size()
    if shards[-1]:
        flush()
    n = len(shards) - 1
    files = {i: f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}
    for i, name in files.items():
        (out / f"part-{i:05d}.safetensors").rename(out / name)
    index = {"metadata": {"total_size": sum((out / f).stat().st_size for f in files.values())},
             "weight_map": {k: files[i] for k, i in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    import transformers

    # transformers_version as save_pretrained writes it: without it transformers 5 takes a local
    # tokenizer beside this config for an old Mistral one and warns about its regex.
    cfg = {**cfg, "torch_dtype": str(dtype).removeprefix("torch."), "transformers_version": transformers.__version__}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
