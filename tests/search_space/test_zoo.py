"""Discovery and plan application across the torchvision classification zoo (weights=None).

Each model is discovered, pruned by a seeded random layer plan (ratios in [0.1, 0.5]), and
checked: it runs, its output shapes are unchanged, every planned group's root keeps exactly
the channels Torch-Pruning's rounding implies, excluded layers keep theirs, and params and
MACs fall at least as much as the plan's root layers alone account for.

Heavy members of a family are built from torchvision's own classes with fewer blocks
(DenseNet, Wide-ResNet, ConvNeXt, ViT, Swin): the same layer types, a fraction of the time.
"""

from __future__ import annotations

import copy
import random
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch_pruning as tp
import torchvision.models as tvm
from torch import nn
from torchvision.models import convnext, densenet, resnet, swin_transformer, vision_transformer
from torchvision.ops.misc import FrozenBatchNorm2d

from search_space import Discovery, PatchMergingPruner, PruningPlan, WindowAttentionPruner, discover
from workers import apply_plan, load_pruned, save_pruned

LOW, HIGH = 0.1, 0.5
CLASSES = 10


@dataclass
class Pruned:
    model: nn.Module
    pruned: nn.Module
    discovery: Discovery
    plan: PruningPlan
    x: torch.Tensor


# -- family-specific checks ------------------------------------------------------------------
def check_grouped_convs(r: Pruned) -> None:
    grouped = [
        (n, m)
        for n, m in r.pruned.named_modules()
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels
    ]
    assert grouped, "expected grouped convolutions"
    before = dict(r.model.named_modules())
    for name, conv in grouped:
        assert conv.groups == before[name].groups  # groups kept, channels per group shrink
        assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0


def check_vit(r: Pruned) -> None:
    d = r.discovery
    assert {n for n, _ in d.unwrapped} == {"class_token", "encoder.pos_embedding"}
    assert all(heads == 4 for _, heads in d.channel_groups) and len(d.channel_groups) == 2
    vit = r.pruned
    width = vit.class_token.shape[-1]
    assert (
        vit.hidden_dim == width == vit.conv_proj.out_channels == vit.encoder.pos_embedding.shape[-1]
    )
    for block in vit.encoder.layers:
        attn = block.self_attention
        assert attn.num_heads == 4 and attn.embed_dim == width and attn.head_dim * 4 == width
    assert width < 64  # the embedding group was planned (head dims shrank, heads kept)


def check_swin(r: Pruned) -> None:
    d = r.discovery
    assert any(n.endswith(".attn") for n in d.leaves) and d.channel_groups
    assert any(e.name.endswith("attn.qkv") and "cannot trace" in e.reason for e in d.excluded)
    for name, m in r.pruned.named_modules():
        if isinstance(m, swin_transformer.ShiftedWindowAttention):
            heads = dict(d.channel_groups)[name]
            assert m.num_heads == heads and m.proj.out_features % heads == 0
            assert m.qkv.out_features == 3 * m.proj.out_features == 3 * m.qkv.in_features
    assert any(e.name.endswith("attn.qkv") for e in r.discovery.excluded)
    widths = [
        m.proj.out_features
        for m in r.pruned.modules()
        if isinstance(m, swin_transformer.ShiftedWindowAttention)
    ]
    assert min(widths) < 32  # embedding channels were pruned through the attention leaves


def check_shufflenet(r: Pruned) -> None:
    shuffled = [e for e in r.discovery.excluded if "channel_shuffle" in e.reason]
    assert shuffled and all(".branch" in e.name for e in shuffled)
    assert "conv1.0" in r.discovery.names  # the stem feeds no shuffle: still prunable


def check_googlenet_aux(r: Pruned) -> None:
    d = r.discovery
    assert d.trace_mode == "train"
    assert set(d.output_layers) == {"fc", "aux1.fc2", "aux2.fc2"}
    with torch.no_grad():
        r.pruned.train()
        outputs = r.pruned(r.x)  # the auxiliary heads still fit the pruned trunk
        r.pruned.eval()
    assert [tuple(o.shape) for o in outputs] == [(1, CLASSES)] * 3


def check_convnext(r: Pruned) -> None:
    for m in r.pruned.modules():
        if isinstance(m, convnext.CNBlock):
            assert m.layer_scale.shape[0] == m.block[0].out_channels


def check_frozen_norm(r: Pruned) -> None:
    # A detection backbone's norm: its state is buffers, which Torch-Pruning does not see, so
    # every conv before one failed the dry run and the model had no groups.
    assert [e.name for e in r.discovery.excluded] == ["fc"]
    modules = dict(r.pruned.named_modules())
    for name, m in modules.items():
        if isinstance(m, FrozenBatchNorm2d):
            conv = modules[name.replace("bn", "conv").replace("downsample.1", "downsample.0")]
            widths = {tuple(getattr(m, b).shape) for b in ("weight", "bias", "running_mean")}
            assert widths == {(conv.out_channels,)} and m.running_var.shape == (conv.out_channels,)
    assert r.pruned.conv1.out_channels < 64


# -- the zoo -------------------------------------------------------------------------------
def _small_vit() -> nn.Module:
    return vision_transformer.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=CLASSES,
    )


def _small_swin(v2: bool = False) -> nn.Module:
    extra = (
        {
            "block": swin_transformer.SwinTransformerBlockV2,
            "downsample_layer": swin_transformer.PatchMergingV2,
        }
        if v2
        else {}
    )
    return swin_transformer.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=32,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=[4, 4],
        num_classes=CLASSES,
        **extra,
    )


# (id, constructor, input size, the classifier's name, extra check)
ZOO: list[tuple[str, Callable[[], nn.Module], int, str, Callable[[Pruned], None] | None]] = [
    ("resnet18", lambda: tvm.resnet18(num_classes=CLASSES), 64, "fc", None),
    (
        "resnet18_frozen_bn",
        lambda: tvm.resnet18(num_classes=CLASSES, norm_layer=FrozenBatchNorm2d),
        64,
        "fc",
        check_frozen_norm,
    ),
    (
        "resnext50_32x4d",
        lambda: tvm.resnext50_32x4d(num_classes=CLASSES),
        64,
        "fc",
        check_grouped_convs,
    ),
    (
        "wide_resnet",
        lambda: resnet.ResNet(
            resnet.Bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=CLASSES
        ),
        64,
        "fc",
        None,
    ),
    ("vgg11", lambda: tvm.vgg11(num_classes=CLASSES), 32, "classifier.6", None),
    ("vgg11_bn", lambda: tvm.vgg11_bn(num_classes=CLASSES), 32, "classifier.6", None),
    (
        "densenet",
        lambda: densenet.DenseNet(12, (2, 2, 2, 2), 16, num_classes=CLASSES),
        64,
        "classifier",
        None,
    ),
    ("mobilenet_v2", lambda: tvm.mobilenet_v2(num_classes=CLASSES), 64, "classifier.1", None),
    (
        "mobilenet_v3_small",
        lambda: tvm.mobilenet_v3_small(num_classes=CLASSES),
        64,
        "classifier.3",
        None,
    ),
    ("efficientnet_b0", lambda: tvm.efficientnet_b0(num_classes=CLASSES), 64, "classifier.1", None),
    (
        "regnet_y_400mf",
        lambda: tvm.regnet_y_400mf(num_classes=CLASSES),
        64,
        "fc",
        check_grouped_convs,
    ),
    (
        "shufflenet_v2_x0_5",
        lambda: tvm.shufflenet_v2_x0_5(num_classes=CLASSES),
        64,
        "fc",
        check_shufflenet,
    ),
    ("squeezenet1_1", lambda: tvm.squeezenet1_1(num_classes=CLASSES), 64, "classifier.1", None),
    (
        "convnext",
        lambda: convnext.ConvNeXt(
            [convnext.CNBlockConfig(32, 64, 2), convnext.CNBlockConfig(64, None, 2)],
            num_classes=CLASSES,
        ),
        64,
        "classifier.2",
        check_convnext,
    ),
    ("mnasnet0_5", lambda: tvm.mnasnet0_5(num_classes=CLASSES), 64, "classifier.1", None),
    (
        "googlenet_aux",
        lambda: tvm.googlenet(num_classes=CLASSES, aux_logits=True, init_weights=True),
        64,
        "fc",
        check_googlenet_aux,
    ),
    (
        "inception_v3",
        lambda: tvm.inception_v3(num_classes=CLASSES, aux_logits=False, init_weights=True),
        75,
        "fc",
        None,
    ),
    ("vit", _small_vit, 32, "heads.head", check_vit),
    ("swin", _small_swin, 32, "head", check_swin),
    ("swin_v2", lambda: _small_swin(v2=True), 32, "head", check_swin),
]


def random_plan(discovery: Discovery, seed: int) -> PruningPlan:
    rng = random.Random(seed)
    ratios = {g: round(rng.uniform(LOW, HIGH), 2) for g in discovery.names}
    return PruningPlan(ratios=ratios, units={g: (g,) for g in ratios}, criterion="l1")


def channel_groups(model: nn.Module, members: tuple[str, ...], discovery: Discovery) -> int:
    """The channel grouping Torch-Pruning applies to a group: grouped convs and heads."""
    modules = dict(model.named_modules())
    heads = dict(discovery.channel_groups)
    found = [1]
    for name in members:
        m = modules[name]
        if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups != m.out_channels:
            found.append(m.groups)
        found.append(heads.get(name, 1))
    return max(found)


def out_width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features


def root_macs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, int]:
    """MACs of each named Conv/Linear: output elements x weights per output element."""
    macs: dict[str, int] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[n].register_forward_hook(
            lambda m, i, o, n=n: macs.__setitem__(n, o.numel() * m.weight[0].numel())
        )
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return macs


@pytest.mark.parametrize("name, build, size, head, check", ZOO, ids=[z[0] for z in ZOO])
def test_a_random_plan_prunes_the_model_as_planned(name, build, size, head, check, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left out are reported; asserted below
        discovery = discover(model, x)
    assert head in discovery.output_layers
    assert any(e.name == head and "output layer" in e.reason for e in discovery.excluded)
    assert discovery.groups

    plan = random_plan(discovery, zlib.crc32(name.encode()))
    pruned = apply_plan(model, x, plan)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (1, CLASSES)

    # 1. Each planned root keeps exactly what TP's rounding gives: with k channel groups
    #    (grouped convs, heads) each group keeps int((c / k) * (1 - r)) channels.
    modules, before = dict(pruned.named_modules()), dict(model.named_modules())
    ratios = plan.group_ratios()
    for g in discovery.groups:
        k = channel_groups(model, g.members, discovery)
        assert g.split == k, (g.name, g.split, k)  # what the allocator steps by
        expected = k * int((g.channels // k) * (1 - ratios[g.name]))
        assert out_width(modules[g.name]) == expected, (g.name, g.channels, k, ratios[g.name])
    # 2. The classifier and the groups discovery excluded keep their channels.
    #    (Layers inside an attention leaf shrink with the embedding they read: not "kept".)
    inside_leaf = {
        e.name
        for e in discovery.excluded
        for leaf in discovery.leaves
        if e.name.startswith(leaf + ".")
    }
    for e in discovery.excluded:
        if (
            isinstance(before.get(e.name), (nn.modules.conv._ConvNd, nn.Linear))
            and e.name not in _members(discovery) | inside_leaf
        ):
            assert out_width(modules[e.name]) == out_width(before[e.name]), e
    # 3. Params and MACs fall at least by what the roots alone lose. A root keeps at most
    #    (1 - r) of its outputs (TP floors), and its inputs can only shrink, so removed params
    #    >= sum over groups of r * params(root); same for MACs. Tolerance: 0 (a strict bound).
    macs0, params0 = tp.utils.count_ops_and_params(model, x)
    macs1, params1 = tp.utils.count_ops_and_params(pruned, x)
    roots = [g.name for g in discovery.groups]
    root_params = {n: sum(p.numel() for p in before[n].parameters()) for n in roots}
    per_root_macs = root_macs(model, x, roots)
    assert params0 - params1 >= sum(ratios[n] * root_params[n] for n in roots) > 0
    # Layers that only run in training mode (auxiliary heads) cost no MACs at inference.
    assert macs0 - macs1 >= sum(ratios[n] * per_root_macs.get(n, 0) for n in roots) > 0
    if check is not None:
        check(Pruned(model, pruned, discovery, plan, x))
    # 4. The pruned model survives its file (what every trial saves and the registry serves):
    #    rebuilt on a fresh copy of the base model, it computes the same outputs.
    path = save_pruned(pruned, plan, tmp_path / f"{name}.safetensors", base_model=model)
    loaded, _ = load_pruned(path, copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned(x))


def _members(discovery: Discovery) -> set[str]:
    return {m for g in discovery.groups for m in g.members}


# -- the automatic safety net and the custom layer pruners ------------------------------------
class FixedWidth(nn.Module):
    """One branch reshapes by a width written in its code: pruning it breaks forward (one
    stored in an attribute follows the cut: test_stored_views)."""

    def __init__(self) -> None:
        super().__init__()
        self.fixed = nn.Conv2d(3, 8, 3)
        self.free = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fixed(x)
        y = y.view(y.shape[0], 8, -1).mean(-1)
        return self.fc(torch.cat([y, self.free(x).mean((2, 3))], 1))


def test_a_group_whose_pruning_breaks_forward_is_excluded_with_the_error():
    model = FixedWidth().eval()
    with pytest.warns(UserWarning, match="fixed: pruning it breaks the model"):
        d = discover(model, torch.randn(1, 3, 8, 8))
    assert d.names == ("free",)
    reason = next(e.reason for e in d.excluded if e.name == "fixed")
    assert reason.startswith("pruning it breaks the model: RuntimeError")
    # The remaining space prunes cleanly.
    plan = PruningPlan(ratios={"free": 0.5}, units={"free": ("free",)})
    assert apply_plan(model, torch.randn(1, 3, 8, 8), plan).free.out_channels == 4


def test_patch_merging_pruner_removes_exactly_the_pruned_channels():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 8)
    drop, keep = [1, 5], [i for i in range(8) if i not in (1, 5)]
    with torch.no_grad():
        # v2 reduces first: input channels that carry zeros contribute nothing, so pruning
        # them gives the same output as zeroing them.
        merge = swin_transformer.PatchMergingV2(8).eval()
        zeroed = x.clone()
        zeroed[..., drop] = 0.0
        expected = merge(zeroed)
        PatchMergingPruner(norm_first=False).prune_in_channels(merge, drop)
        assert (merge.dim, merge.reduction.in_features) == (6, 24)
        torch.testing.assert_close(merge(x[..., keep]), expected)
        # v1 reduces last: pruning outputs removes exactly those output channels.
        merge = swin_transformer.PatchMerging(8).eval()
        expected = merge(x)[..., [i for i in range(16) if i not in (0, 3)]]
        PatchMergingPruner(norm_first=True).prune_out_channels(merge, [0, 3])
        torch.testing.assert_close(merge(x), expected)
        # v1 inputs: the norm over the concatenation loses the same four copies.
        PatchMergingPruner(norm_first=True).prune_in_channels(merge, drop)
        assert merge.norm.normalized_shape == (24,) and merge(x[..., keep]).shape == (1, 2, 2, 14)


def test_window_attention_pruner_keeps_heads_and_shrinks_head_dims():
    torch.manual_seed(0)
    attn = swin_transformer.ShiftedWindowAttention(16, [4, 4], [2, 2], num_heads=2).eval()
    pruner = WindowAttentionPruner()
    # one offset per head (8 channels per head): the head dim goes 8 -> 7
    pruner(attn, [3, 11])
    assert (
        attn.num_heads,
        attn.qkv.in_features,
        attn.qkv.out_features,
        attn.proj.out_features,
    ) == (2, 14, 42, 14)
    assert attn(torch.randn(1, 8, 8, 14)).shape == (1, 8, 8, 14)
    with pytest.raises(AssertionError, match="do not split into 2 heads"):
        pruner(attn, [0])
