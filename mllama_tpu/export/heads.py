"""Token heads run on device after lm_head: greedy pick, and penalised top-k/top-p sampling.

Both compile to static, single-subnet BM1684X nets. TPU-MLIR lowers ONNX TopK to the chip's
hardware sort unit, which only runs in a dynamic subnet: no cycle estimate, a round trip to
the host per launch, and on the simulator ~18 s per launch over a 128256-id vocabulary. So
neither head uses TopK: greedy is ArgMax (a static TPU op), and the sampling head's top-k is
`TreeTopK`, built from ReduceMax, Gather, Compare and ScatterElements.

The sampling head leaves the final random draw to the host (it returns the K candidate
tokens and their probabilities), so it is deterministic and testable. The repeat penalty
gathers the recent ids' logits, penalises them and scatters them back (ScatterElements, a
static op): the window is padded by repeating an id, and every copy writes the same value.
"""
from __future__ import annotations

import torch
from torch import nn


class GreedyHead(nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        # ArgMax keeps the first of equal maxima, as transformers' greedy search does.
        return torch.argmax(logits, dim=-1).reshape(1).to(torch.int32)


def _rank_select(values: torch.Tensor, index: torch.Tensor, k: int, earlier: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of values [M] (equal values: the earlier position first) with their index [M].

    Each value's rank is the number of values that beat it, so the ranks are a permutation of
    0..M-1 and scattering by rank sorts. Tensors are [1,M,1,M] so that M lies across the chip's
    lanes and along each lane's row (a 2-D [M,M] maps to N x C and moves element by element).
    `earlier` [1,M,1,M] is the constant "position b comes before position a".
    """
    m = values.shape[0]
    va, vb = values.view(1, m, 1, 1), values.view(1, 1, 1, m)
    # (f32 branches: onnxruntime has no Where over bool values)
    beats = torch.where(earlier, (vb >= va).to(torch.float32), (vb > va).to(torch.float32))
    rank = beats.sum(dim=3).view(m).to(torch.int64)
    sorted_values = torch.zeros(m).scatter(0, rank, values)
    sorted_index = torch.zeros(m).scatter(0, rank, index)
    return sorted_values[:k], sorted_index[:k]


def _earlier(m: int) -> nn.Parameter:
    return nn.Parameter(torch.ones(m, m).tril(-1).bool().view(1, m, 1, m), requires_grad=False)


class TreeTopK(nn.Module):
    """Static top-k of a [V] vector: values [k] (descending) and their indices [k] (f32, exact
    below 2**24).

    A tournament: the vector is cut into groups of `fan`, each group keeps its maximum, and so
    on until at most `top_max` remain; the k best of those are ranked directly, and then each
    level down only the k * fan children of the k groups kept above are ranked. That is exact:
    an element in the top k has a group maximum at least as large, and if that group were not
    among the k best groups, k other group maxima (k other elements) would beat it. Per launch
    this ranks top_max**2 + levels * (k * fan)**2 pairs instead of sorting V.
    """

    def __init__(self, size: int, k: int, fan: int = 4, top_max: int = 512) -> None:
        super().__init__()
        self.k, self.fan = k, fan
        self.levels: list[tuple[int, int]] = []  # (length, length padded to a multiple of fan)
        n = size
        while n > top_max:
            padded = -(-n // fan) * fan
            self.levels.append((n, padded))
            n = padded // fan
        if n < k:
            raise ValueError(f"top-{k} of {size} values")
        self.top_index = nn.Parameter(torch.arange(n, dtype=torch.float32), requires_grad=False)
        self.fan_index = nn.Parameter(torch.arange(fan, dtype=torch.float32).view(1, 1, 1, fan), requires_grad=False)
        self.earlier_top = _earlier(n)
        self.earlier_level = _earlier(k * fan) if self.levels else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        below = []
        for n, padded in self.levels:
            if padded > n:
                x = torch.cat([x, torch.full((padded - n,), float("-inf"))])
            below.append(x)
            x = x.view(1, padded // self.fan, 1, self.fan).amax(dim=3).view(-1)
        values, index = _rank_select(x, self.top_index, self.k, self.earlier_top)
        for level in reversed(below):
            children = level.view(1, -1, 1, self.fan).index_select(1, index.to(torch.int64))  # [1,k,1,fan]
            child_index = index.view(1, -1, 1, 1) * self.fan + self.fan_index
            values, index = _rank_select(children.reshape(-1), child_index.reshape(-1), self.k, self.earlier_level)
        return values, index


class PenaltySampleHead(nn.Module):
    """logits [1,V], recent_ids [1,R], top_p [1], temperature [1], repeat_penalty [1]
    -> probs [1,K] (sum 1, zero outside the top-p set), tokens [1,K] i32 (descending logit)."""

    def __init__(self, vocab_size: int, top_k: int) -> None:
        super().__init__()
        self.top_k = TreeTopK(vocab_size, top_k)

    def forward(self, logits: torch.Tensor, recent_ids: torch.Tensor, top_p: torch.Tensor,
                temperature: torch.Tensor, repeat_penalty: torch.Tensor):
        # Repeat penalty (as transformers: negative logits multiplied, positive divided) on seen ids.
        # The window holds prompt ids too, and <|image|> is past lm_head: ids >= V go to a spare
        # slot V, so no gather or scatter leaves the tensor.
        v = logits.shape[-1]
        ids = torch.clamp(recent_ids.to(torch.float32), max=float(v)).to(torch.int64)
        padded = torch.cat([logits, torch.zeros(1, 1)], dim=1)
        seen = torch.gather(padded, 1, ids)
        padded = padded.scatter(1, ids, torch.where(seen < 0, seen * repeat_penalty, seen / repeat_penalty))
        logits = padded[:, :v]
        # Top-k first (temperature > 0 keeps the order), then temperature, then top-p.
        values, tokens = self.top_k(logits.reshape(-1))
        probs = torch.softmax(values.view(1, -1) / temperature, dim=-1)
        # Keep a token while the mass strictly before it is < top_p: the first always stays.
        before = torch.cumsum(probs, dim=-1) - probs
        kept = probs * (before < top_p).to(torch.float32)
        return kept / kept.sum(dim=-1, keepdim=True), tokens.view(1, -1).to(torch.int32)
