"""Export-friendly Mllama vision encoder + multi-modal projector (the `vit` piece).

Same math as transformers' MllamaVisionModel for one image of T (= max_num_tiles) tiles,
with every shape fixed at export time:
  - tile / position embeddings are gathered by aspect_ratio_ids from tables whose tanh
    gates are folded in at export;
  - padding to a multiple of 8 patches is a concat with zeros (no Pad of dynamic size);
  - the attention mask over T*Pp positions is built with broadcast ops from
    aspect_ratio_mask and a constant "real patch" row (no ScatterND). Like transformers,
    a position is hidden only when both the query and the key are padding.
Input weights: the checkpoint's `vision.*` and `projector.*` tensors (mllama_tpu.weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mllama_tpu.config import ModelDims
from mllama_tpu.contract import MASK_HIDDEN
from mllama_tpu.export.text import Linear, _const



class LayerNorm(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], prefix: str, eps: float) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = _const(w.pop(prefix + ".weight")), _const(w.pop(prefix + ".bias")), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class VisionLayer(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], prefix: str, dims: ModelDims, gated: bool) -> None:
        super().__init__()
        p, eps = prefix, dims.vision_norm_eps
        self.heads, self.head_dim = dims.vision_num_heads, dims.vision_head_dim
        self.input_layernorm = LayerNorm(w, p + "input_layernorm", eps)
        self.post_attention_layernorm = LayerNorm(w, p + "post_attention_layernorm", eps)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            Linear(w.pop(p + f"self_attn.{n}_proj.weight")) for n in "qkvo")
        self.fc1 = Linear(w.pop(p + "mlp.fc1.weight"), w.pop(p + "mlp.fc1.bias"))
        self.fc2 = Linear(w.pop(p + "mlp.fc2.weight"), w.pop(p + "mlp.fc2.bias"))
        # Global layers scale both branches by tanh(gate), folded here; local layers have no gates.
        self.gate_attn = float(torch.tanh(w.pop(p + "gate_attn")).item()) if gated else None
        self.gate_ffn = float(torch.tanh(w.pop(p + "gate_ffn")).item()) if gated else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = self.input_layernorm(x)
        q, k, v = (proj(h).view(1, n, self.heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        scores = torch.matmul(q, k.transpose(2, 3)) * (self.head_dim ** -0.5) + mask
        a = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(1, n, -1)
        a = self.o_proj(a)
        x = x + (a if self.gate_attn is None else self.gate_attn * a)
        m = self.fc2(F.gelu(self.fc1(self.post_attention_layernorm(x))))
        return x + (m if self.gate_ffn is None else self.gate_ffn * m)


class VisionEncoder(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], projector: dict[str, torch.Tensor], dims: ModelDims) -> None:
        super().__init__()
        self.dims = dims
        t, c, p = dims.max_num_tiles, dims.vision_hidden_size, dims.num_patches
        self.patch_embedding = _const(w.pop("patch_embedding.weight"))
        self.class_rows = _const(w.pop("class_embedding").view(1, 1, c).expand(t, 1, c))
        pre_gate = torch.tanh(w.pop("pre_tile_positional_embedding.gate"))
        post_gate = torch.tanh(w.pop("post_tile_positional_embedding.gate"))
        pos_gate = torch.tanh(w.pop("gated_positional_embedding.gate"))
        self.pre_tile = _const(w.pop("pre_tile_positional_embedding.embedding.weight") * pre_gate)
        self.post_tile = _const(w.pop("post_tile_positional_embedding.embedding.weight") * post_gate)
        self.position = _const((1 - pos_gate) * w.pop("gated_positional_embedding.embedding"))
        self.tile_position = _const(w.pop("gated_positional_embedding.tile_embedding.weight") * pos_gate)
        self.layernorm_pre = LayerNorm(w, "layernorm_pre", 1e-5)  # nn.LayerNorm default eps
        self.layernorm_post = LayerNorm(w, "layernorm_post", 1e-5)
        self.local_layers = nn.ModuleList(
            VisionLayer(w, f"transformer.layers.{i}.", dims, gated=False) for i in range(dims.vision_num_layers))
        self.global_layers = nn.ModuleList(
            VisionLayer(w, f"global_transformer.layers.{i}.", dims, gated=True)
            for i in range(dims.vision_num_global_layers))
        pad = dims.padded_patches - p
        self.padding = _const(torch.zeros(t, pad, c)) if pad else None
        self.real_patch = _const((torch.arange(dims.padded_patches) < p).float().view(1, -1))
        self.projector = Linear(projector["weight"], projector["bias"])

    def _mask(self, aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """[1,T] tile validity -> additive [1,1,N,N] over N = T*Pp positions."""
        valid = aspect_ratio_mask.to(torch.float32).reshape(-1, 1) * self.real_patch  # [T,Pp]
        pad = (1 - valid).reshape(1, 1, -1, 1)
        return pad * pad.reshape(1, 1, 1, -1) * MASK_HIDDEN

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        d = self.dims
        t, c, p, pp = d.max_num_tiles, d.vision_hidden_size, d.num_patches, d.padded_patches
        ar = aspect_ratio_ids.long()  # [1,1], gathered as is (no Reshape of a graph input: TPU-MLIR op-reorder bug)
        x = F.conv2d(pixel_values, self.patch_embedding, stride=d.patch_size)  # [T,C,g,g]
        x = x.reshape(t, c, p - 1).transpose(1, 2)  # [T,g*g,C] (static reshape: flatten would emit Shape)
        x = x + F.embedding(ar, self.pre_tile).view(t, 1, c)
        x = torch.cat([self.class_rows, x], dim=1)  # [T,P,C]
        x = x + self.position + F.embedding(ar, self.tile_position).view(t, p, c)
        x = self.layernorm_pre(x)
        if self.padding is not None:
            x = torch.cat([x, self.padding], dim=1)
        x = x.reshape(1, t * pp, c)
        mask = self._mask(aspect_ratio_mask)
        after: dict[int, torch.Tensor] = {}  # local layer index -> its output, for the kept ones
        for i, layer in enumerate(self.local_layers):
            x = layer(x, mask)
            if i in d.vision_intermediate_layers:
                after[i] = x
        x = self.layernorm_post(x).view(t, pp, c)
        x = (x + F.embedding(ar, self.post_tile).view(t, 1, c)).reshape(1, t * pp, c)
        for layer in self.global_layers:
            x = layer(x, mask)
        # Intermediate features are interleaved per channel (stacked on the last axis), as in transformers.
        inter = torch.stack([after[i] for i in d.vision_intermediate_layers], dim=-1).reshape(t, pp, -1)[:, :p]
        x = torch.cat([x.reshape(t, pp, c)[:, :p], inter], dim=-1)
        return self.projector(x)  # [T,P,H]
