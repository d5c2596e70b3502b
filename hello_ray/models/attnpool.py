"""CLIP-ResNet's attention pool computed for the one token it returns (frozen labelling only).

open_clip's ``AttentionPool2d`` runs full self-attention over the HW + 1 tokens of the last
feature map (RN50 at 224 px: 50 tokens of width 2048) and then keeps token 0 (the mean token): the
q, k, v and output projections of the other 49 tokens are thrown away, ~1.5 GFLOPs of RN50's
~6 per image. Only token 0's query is needed, and since attention is linear in keys and values,
each head's key and value projections can move to the other side of the sums:

    score_hj = q_h . (Wk_h x_j + bk_h) = (Wk_h^T q_h) . x_j + q_h . bk_h
    out_h    = sum_j a_hj (Wv_h x_j + bv_h) = Wv_h (sum_j a_hj x_j) + bv_h     (sum_j a_hj = 1)

so no token but the query is ever projected: the same numbers (up to float rounding) for ~1/40 of
the pool's FLOPs. Weights are the module's own parameters (shared, not copied), so a merged
LoRA or loaded adapter is seen as is.
"""
from __future__ import annotations

import torch
from torch import nn

from hello_ray.models.modules import replace_submodule


class QueryTokenAttentionPool(nn.Module):
    """Drop-in for ``open_clip.modified_resnet.AttentionPool2d`` in eval/inference."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.positional_embedding = pool.positional_embedding    # [HW+1, D]
        self.q_proj, self.k_proj, self.v_proj, self.c_proj = pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj
        self.num_heads = pool.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [N, D, H, W] -> [N, D_out]
        n, d = x.shape[:2]
        h = self.num_heads
        hd = d // h
        tokens = x.reshape(n, d, -1).transpose(1, 2)               # [N, HW, D]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)   # [N, T, D], T = HW+1
        q = self.q_proj(tokens[:, 0]).view(n, h, hd) * hd ** -0.5  # [N, h, hd] (scaled as in MHA)
        wk = self.k_proj.weight.view(h, hd, d)                     # [h, hd, D]
        wv = self.v_proj.weight.view(h, hd, d)
        q_in = torch.einsum("nhe,hed->nhd", q, wk.to(q.dtype))     # [N, h, D]: Wk_h^T q_h
        scores = torch.einsum("nhd,ntd->nht", q_in, tokens.to(q_in.dtype))  # [N, h, T]
        if self.k_proj.bias is not None:                           # q_h . bk_h: the same for every token
            scores = scores + (q * self.k_proj.bias.view(h, hd).to(q.dtype)).sum(-1, keepdim=True)
        attn = scores.softmax(dim=-1)                               # [N, h, T]
        pooled = torch.einsum("nht,ntd->nhd", attn.to(tokens.dtype), tokens)   # [N, h, D]
        out = torch.einsum("nhd,hed->nhe", pooled, wv.to(pooled.dtype))        # [N, h, hd]
        if self.v_proj.bias is not None:
            out = out + self.v_proj.bias.view(h, hd).to(out.dtype)
        return self.c_proj(out.reshape(n, d))                      # [N, D_out]


def use_query_token_pool(model: nn.Module) -> int:
    """Swap every open_clip ``AttentionPool2d`` inside ``model`` for the query-token form; returns
    how many were swapped (0 for models without one, e.g. ViTs or torchvision teachers)."""
    from open_clip.modified_resnet import AttentionPool2d

    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, AttentionPool2d):
            replace_submodule(model, name, QueryTokenAttentionPool(module))
            swapped += 1
    return swapped
