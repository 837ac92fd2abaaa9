"""Token heads run on device after lm_head: greedy pick, and penalised top-k/top-p sampling.

The sampling head leaves the final random draw to the host (it returns the K candidate
tokens and their probabilities), so it is deterministic and testable. It avoids ScatterND:
the repeat penalty marks the recent ids by comparing them with arange(V) (a one-hot sum)
instead of scattering into the logits.
"""
from __future__ import annotations

import torch
from torch import nn


class GreedyHead(nn.Module):
    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        _, token = torch.topk(logits, 1, dim=-1)  # [1,1]; topk maps to TPU-MLIR's TopK
        return token.reshape(1).to(torch.int32)


class PenaltySampleHead(nn.Module):
    """logits [1,V], recent_ids [1,R], top_p [1], temperature [1], repeat_penalty [1]
    -> probs [1,K] (sum 1, zero outside the top-p set), tokens [1,K] i32 (descending logit)."""

    def __init__(self, vocab_size: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.vocab = nn.Parameter(torch.arange(vocab_size, dtype=torch.float32).view(1, 1, vocab_size),
                                  requires_grad=False)

    def forward(self, logits: torch.Tensor, recent_ids: torch.Tensor, top_p: torch.Tensor,
                temperature: torch.Tensor, repeat_penalty: torch.Tensor):
        # Repeat penalty (as transformers: negative logits multiplied, positive divided) on seen ids.
        ids = recent_ids.to(torch.float32).unsqueeze(-1)  # [1,R,1]
        seen = (ids == self.vocab).to(torch.float32).amax(dim=1)  # [1,V], 1 where the id is recent
        penalised = torch.where(logits < 0, logits * repeat_penalty, logits / repeat_penalty)
        logits = seen * penalised + (1 - seen) * logits
        # Top-k first (temperature > 0 keeps the order), then temperature, then top-p.
        values, tokens = torch.topk(logits, self.top_k, dim=-1)
        probs = torch.softmax(values / temperature, dim=-1)
        # Keep a token while the mass strictly before it is < top_p: the first always stays.
        before = torch.cumsum(probs, dim=-1) - probs
        keep = (before < top_p).to(torch.float32)
        kept = probs * keep
        return kept / kept.sum(dim=-1, keepdim=True), tokens.to(torch.int32)
