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


class MixedConv(nn.Module):
    """timm's ``MixedConv2d``, as its library writes it: the input split by sizes stored when it
    was built, one conv per piece (each its own kernel size), the pieces joined again."""

    def __init__(self, cin: int, cout: int, kernels: list[int], depthwise: bool = False) -> None:
        super().__init__()
        ins, outs = _split_channels(cin, len(kernels)), _split_channels(cout, len(kernels))
        self.convs = nn.ModuleList(
            nn.Conv2d(i, o, k, padding=k // 2, groups=i if depthwise else 1, bias=False)
            for i, o, k in zip(ins, outs, kernels, strict=True)
        )
        self.splits = ins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(x, self.splits, 1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, pieces, strict=True)], 1)


def _split_channels(channels: int, n: int) -> list[int]:
    sizes = [channels // n] * n
    sizes[0] += channels - sum(sizes)
    return sizes


class MixBlock(nn.Module):
    """MixNet's inverted residual: a pointwise expansion, a depthwise ``MixedConv`` of three
    kernel sizes, squeeze-and-excitation (``se``) and a projection, each optionally mixed."""

    def __init__(self, se: bool = True, mixed_pointwise: bool = True) -> None:
        super().__init__()
        self.se = se
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        pointwise = MixedConv if mixed_pointwise else _plain_pointwise
        self.expand = pointwise(16, 36, [1, 1])
        self.bn1, self.bn2 = nn.BatchNorm2d(36), nn.BatchNorm2d(36)
        self.depthwise = MixedConv(36, 36, [3, 5, 7], depthwise=True)
        self.reduce, self.excite = nn.Conv2d(36, 8, 1), nn.Conv2d(8, 36, 1)
        self.project = pointwise(36, 16, [1, 1])
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn2(self.depthwise(torch.relu(self.bn1(self.expand(x))))))
        if self.se:
            gate = self.excite(torch.relu(self.reduce(y.mean((2, 3), keepdim=True))))
            y = y * torch.sigmoid(gate)
        return self.head((self.project(y) + x).mean((2, 3)))


def _plain_pointwise(cin: int, cout: int, _kernels: list[int]) -> nn.Module:
    return nn.Conv2d(cin, cout, 1, bias=False)


class StoredAttention(nn.Module):
    """timm's ``Attention``, as its library writes it: the fused projection reshaped by the head
    count and width it stored when it was built, and the heads' output by their total width."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.attn_dim, self.scale = dim, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.attn_dim))


class SeparateAttention(nn.Module):
    """Attention as Hugging Face's BERT and ViT write it: a query, key and value layer each
    viewed by one shape of stored sizes built once (``new_shape``), the tokens left to its -1,
    and the heads' output reshaped by a shape that ends in their stored total width."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_size = heads, dim // heads
        self.all_head_size, self.scaling = dim, (dim // heads) ** -0.5
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new_shape = x.shape[0], -1, self.num_heads, self.head_size
        q = self.query(x).view(*new_shape).transpose(1, 2)
        k = self.key(x).view(*new_shape).transpose(1, 2)
        v = self.value(x).view(*new_shape).transpose(1, 2)
        context = ((q @ k.transpose(-2, -1)) * self.scaling).softmax(-1) @ v
        context = context.transpose(1, 2)
        merged = context.size()[:-2] + (self.all_head_size,)
        return context.reshape(merged)


class LocalWidthAttention(SeparateAttention):
    """DistilBERT's form: the head width a local its forward computed from stored sizes
    (``dim_per_head = self.dim // self.n_heads``), read by a function defined in it, and the
    heads merged by that local again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.all_head_size // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(x.shape[0], -1, self.num_heads, width).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        context = ((q @ k.transpose(-2, -1)) * self.scaling).softmax(-1) @ v
        return context.transpose(1, 2).reshape(x.shape[0], -1, self.num_heads * width)


class InputWidthAttention(LocalWidthAttention):
    """The head width read off the input (``x.shape[-1] // self.num_heads``): nothing stored
    holds it, and the view's only stored size is the head count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1] // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(x.shape[0], -1, self.num_heads, width).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        context = ((q @ k.transpose(-2, -1)) * self.scaling).softmax(-1) @ v
        return context.transpose(1, 2).flatten(2)


class SplitAttention(nn.Module):
    """GPT-2's attention as its library writes it: one fused projection split by a part size it
    stored (``split(self.split_size, dim=2)``), each part viewed as heads of a stored width with
    their count left to the -1 of a shape built before the view."""

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.split_size = heads, dim // heads, dim
        self.c_attn = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.split_size, dim=2)
        shape = (*q.shape[:-1], -1, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        a = (q @ k.transpose(-2, -1) * 0.3).softmax(-1) @ v
        return a.transpose(1, 2).reshape(*x.shape[:-1], -1)


class SeparateViT(nn.Module):
    """A pre-norm block of ``attention`` (``SeparateAttention`` by default) with an output
    projection and an MLP, over a token sequence."""

    def __init__(
        self, attention: type[nn.Module] = SeparateAttention, d: int = 32, depth: int = 1
    ) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(8, d), nn.Linear(d, 5)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.out = attention(d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        # Further attention blocks, as a deeper model has them.
        self.more = nn.ModuleList(
            nn.ModuleList([attention(d), nn.Linear(d, d)]) for _ in range(depth - 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.out(self.attn(self.norm1(h)))
        for attn, out in self.more:
            h = h + out(attn(h))
        h = h + self.fc2(torch.relu(self.fc1(self.norm2(h))))
        return self.head(h.mean(1))


class StoredViT(nn.Module):
    """A pre-norm transformer block of ``StoredAttention`` and an MLP over a token sequence."""

    def __init__(self, n_in: int = 8, d: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(n_in, d), nn.Linear(d, classes)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = StoredAttention(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(self.norm1(h))
        h = h + self.fc2(torch.relu(self.fc1(self.norm2(h))))
        return self.head(h.mean(1))
