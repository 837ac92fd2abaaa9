"""Export-friendly text decoder pieces: embedding, self/cross-attention blocks, lm_head.

Static shapes only; KV in the layout the engine keeps on device, [1, seq, kv_heads, head_dim];
rotary by gathering precomputed cos/sin rows with `position_ids`; masks are additive f32
inputs. Weights come in as a dict of f32 tensors named as in the checkpoint under
`text.layers.{i}.` (see mllama_tpu.weights), projection weights already [in, out]; each
module pops what it takes, so no second reference keeps a converted tensor alive.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mllama_tpu.config import ModelDims


def _const(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().float().contiguous(), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = _const(weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Linear(nn.Module):
    """Projection y = x @ W_t (+ b) with the weight given as [in, out] (the checkpoint's
    [out, in] transposed while reading): the ONNX MatMul then reads the initializer as is,
    while a Transpose left for constant folding would copy every weight during export."""

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight_t = _const(weight_t)
        self.bias = _const(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y + self.bias if self.bias is not None else y


class GatedMLP(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.gate_proj = Linear(w.pop("mlp.gate_proj.weight"))
        self.up_proj = Linear(w.pop("mlp.up_proj.weight"))
        self.down_proj = Linear(w.pop("mlp.down_proj.weight"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [1,Sq,NH,D], k/v [1,Sk,KV,D], additive mask [1,1,Sq,Sk] -> [1,Sq,NH*D]."""
    _, sq, nh, d = q.shape
    _, sk, kv, _ = k.shape
    rep = nh // kv
    if sq == 1 and rep > 1:
        return attend_one_query(q, k.transpose(1, 2), v.transpose(1, 2), mask)
    if rep > 1:  # grouped-query attention: head h reads kv head h // rep (one Concat, no Expand)
        k = torch.cat([k] * rep, dim=-1).reshape(1, sk, nh, d)
        v = torch.cat([v] * rep, dim=-1).reshape(1, sk, nh, d)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = torch.matmul(q, k.transpose(2, 3)) * (d ** -0.5) + mask
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).reshape(1, sq, nh * d)


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Decode attention without repeating K/V: q [1,1,NH,D], k/v head-major [1,KV,Sk,D].

    With one query token the rep query heads that share a KV head become rep rows of that KV
    head's attention: q [1,1,NH,D] is already [1,KV,rep,D] by a reshape, no copy. Repeating K/V
    instead made the chip store and re-read rep copies of the whole cache every token (11B:
    8.4 MB instead of 2.1 MB per self-attention layer; bench/README.md has the profiles).
    Prefill keeps the repeated form, which TPU-MLIR fuses better for many query rows.
    """
    _, _, nh, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(1, kv, nh // kv, d)
    scores = torch.matmul(qg, k.transpose(2, 3)) * (d ** -0.5) + mask  # [1,KV,rep,Sk]
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [1,KV,rep,D]
    return out.reshape(1, 1, nh * d)


# Rows from which a cross step reads the head-major cache through its sequence-major view and
# repeats K/V per query head: the form TPU-MLIR fuses into one FAttention. Fewer rows keep the
# grouped form, which reads each KV head once (measured at 11B, ARCHITECTURE.md "Prefill in chunks").
FUSED_CROSS_ROWS = 64


def attend_head_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [1,Sq,NH,D] against head-major k/v [1,KV,Sk,D] (the cross cache), mask [1,1,Sq,Sk]."""
    _, sq, nh, d = q.shape
    if sq == 1:
        return attend_one_query(q, k, v, mask)
    if sq >= FUSED_CROSS_ROWS:
        return attend(q, k.transpose(1, 2), v.transpose(1, 2), mask)
    kv, sk = k.shape[1], k.shape[2]
    rep = nh // kv
    qg = q.transpose(1, 2).reshape(1, kv, rep * sq, d)  # head h = kv head h // rep, row r
    scores = torch.matmul(qg, k.transpose(2, 3)) * (d ** -0.5)  # [1,KV,rep*Sq,Sk]
    scores = scores.reshape(1, kv, rep, sq, sk) + mask.reshape(1, 1, 1, sq, sk)
    probs = torch.softmax(scores, dim=-1).reshape(1, kv, rep * sq, sk)
    out = torch.matmul(probs, v).reshape(1, nh, sq, d)
    return out.transpose(1, 2).reshape(1, sq, nh * d)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SelfAttentionBlock(nn.Module):
    """One self-attention decoder layer over C new tokens against SEQ cache slots (a prefill
    chunk, or C = 1 a decode step); returns the new tokens' K/V only."""

    def __init__(self, w: dict[str, torch.Tensor], dims: ModelDims, cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__()
        self.dims = dims
        self.input_layernorm = RMSNorm(w.pop("input_layernorm.weight"), dims.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(w.pop("post_attention_layernorm.weight"), dims.rms_norm_eps)
        self.q_proj = Linear(w.pop("self_attn.q_proj.weight"))
        self.k_proj = Linear(w.pop("self_attn.k_proj.weight"))
        self.v_proj = Linear(w.pop("self_attn.v_proj.weight"))
        self.o_proj = Linear(w.pop("self_attn.o_proj.weight"))
        self.mlp = GatedMLP(w)
        self.cos, self.sin = _const(cos), _const(sin)

    def forward(self, input_states: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                history_k: torch.Tensor, history_v: torch.Tensor):
        d = self.dims
        s = input_states.shape[1]
        h = self.input_layernorm(input_states)
        q = self.q_proj(h).view(1, s, d.num_attention_heads, d.head_dim)
        k = self.k_proj(h).view(1, s, d.num_key_value_heads, d.head_dim)
        v = self.v_proj(h).view(1, s, d.num_key_value_heads, d.head_dim)
        ids = position_ids.long()  # [1,S]: gathered as is (no Reshape of a graph input, see image_kv)
        cos = F.embedding(ids, self.cos).view(1, s, 1, d.head_dim)
        sin = F.embedding(ids, self.sin).view(1, s, 1, d.head_dim)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        all_k, all_v = torch.cat([history_k, k], dim=1), torch.cat([history_v, v], dim=1)
        x = input_states + self.o_proj(attend(q, all_k, all_v, attention_mask))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class CrossKV(nn.Module):
    """A cross-attention layer's K/V of one image: [T,P,H] states -> head-major [1,KV,T*P,D].

    Head-major because they are written once per image and read by every prefill chunk and
    decode step: the transpose attention needs is paid once (11B: ~0.58 ms per cross layer per
    token otherwise, bench/README.md)."""

    def __init__(self, w: dict[str, torch.Tensor], dims: ModelDims) -> None:
        super().__init__()
        self.dims = dims
        self.k_proj = Linear(w.pop("cross_attn.k_proj.weight"))
        self.v_proj = Linear(w.pop("cross_attn.v_proj.weight"))
        self.k_norm = RMSNorm(w.pop("cross_attn.k_norm.weight"), dims.rms_norm_eps)

    def forward(self, cross_attention_states: torch.Tensor):
        d = self.dims
        # Project the [T,P,H] input as is and flatten the tiles afterwards: a Reshape of a graph
        # input feeding two MatMuls trips TPU-MLIR 1.30's op-reorder pass.
        k, v = self.k_proj(cross_attention_states), self.v_proj(cross_attention_states)  # [T,P,KV*D]
        k = self.k_norm(k.reshape(1, -1, d.num_key_value_heads, d.head_dim))
        v = v.reshape(1, -1, d.num_key_value_heads, d.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)


class CrossAttentionBlock(nn.Module):
    """One cross-attention decoder layer (tanh-gated attention and MLP, q/k RMS norms) over C new
    tokens, reading the image's K/V that CrossKV made."""

    def __init__(self, w: dict[str, torch.Tensor], dims: ModelDims) -> None:
        super().__init__()
        self.dims = dims
        self.input_layernorm = RMSNorm(w.pop("input_layernorm.weight"), dims.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(w.pop("post_attention_layernorm.weight"), dims.rms_norm_eps)
        self.q_proj = Linear(w.pop("cross_attn.q_proj.weight"))
        self.o_proj = Linear(w.pop("cross_attn.o_proj.weight"))
        self.q_norm = RMSNorm(w.pop("cross_attn.q_norm.weight"), dims.rms_norm_eps)
        self.mlp = GatedMLP(w)
        # Gates are constants of the checkpoint: fold tanh now.
        self.attn_gate = float(torch.tanh(w.pop("cross_attn_attn_gate").float()).item())
        self.mlp_gate = float(torch.tanh(w.pop("cross_attn_mlp_gate").float()).item())

    def forward(self, input_states: torch.Tensor, text_row_mask: torch.Tensor, attention_mask: torch.Tensor,
                cross_k: torch.Tensor, cross_v: torch.Tensor) -> torch.Tensor:
        d = self.dims
        x = input_states
        s = x.shape[1]
        q = self.q_norm(self.q_proj(self.input_layernorm(x)).view(1, s, d.num_attention_heads, d.head_dim))
        x = x + self.attn_gate * self.o_proj(attend_head_major(q, cross_k, cross_v, attention_mask))
        # Rows that see no tile keep the attention update but drop the MLP one (as transformers).
        mlp = self.mlp(self.post_attention_layernorm(x)) * text_row_mask.reshape(1, s, 1)
        return x + self.mlp_gate * mlp


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = _const(weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids.long(), self.weight)


class LmHead(nn.Module):
    """Final RMSNorm + vocabulary projection for the last token: [1,H] -> [1,V]."""

    def __init__(self, norm: torch.Tensor, weight_t: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(norm, eps)
        self.proj = Linear(weight_t)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden_states))
