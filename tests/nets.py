"""Small models shared by the test packages: architectures the product must handle generally."""

from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    """A transformer from torch.nn's own layers: fx cannot trace a TransformerEncoderLayer alone
    (its forward takes masks and branches on them), and nn.TransformerEncoder calls each layer
    with masks as keywords."""

    def __init__(self, norm_first: bool = True) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(8, 32), nn.Linear(32, 4)
        layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``, as its library writes it: a dense layer of its own type,
    its weight stored in by out, its output reshaped by a width it stores (``nf``)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GainedDense(nn.Module):
    """A layer written by hand, its weight stored in by out (as GPT-2's ``Conv1D``), with a gain
    of its own: more than a plain dense layer, so no type Torch-Pruning or search_space prunes
    (Torch-Pruning cannot size what it makes)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.gain = nn.Parameter(torch.ones(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight) * self.gain
        return out.view(*x.shape[:-1], -1)


class GPTBlock(nn.Module):
    """GPT-2's block: attention with q, k and v split off one ``Conv1D`` by the model's width
    (a constant), and an MLP of two."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.d, self.heads = d, heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.c_fc, self.c_proj = Conv1D(2 * d, d), Conv1D(d, 2 * d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = self.c_attn(self.ln_1(h)).split(self.d, dim=2)
        q, k, v = (p.view(b, t, self.heads, -1).transpose(1, 2) for p in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.attn_proj(a.transpose(1, 2).reshape(b, t, -1))
        return h + self.c_proj(nn.functional.gelu(self.c_fc(self.ln_2(h))))


class TinyGPT(nn.Module):
    """Two GPT-2 blocks over a sequence of feature vectors, its mean classified."""

    def __init__(self, n_in: int = 8, d: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.embed = Conv1D(d, n_in)
        self.blocks = nn.Sequential(GPTBlock(d), GPTBlock(d))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(self.blocks(self.embed(x))).mean(1))
