"""What Torch-Pruning must be told about particular layer types, in one registry keyed by type.

Torch-Pruning (TP) traces a model through autograd and prunes the layers it knows. Some
torchvision layers need more than that; each such layer *type* gets one :class:`Handler`:

* ``heads``: its channels come in equal groups (attention heads); every group loses the same
  offsets, so head dims shrink and the head count is kept.
* ``unwrapped``: parameters it owns directly (not inside a Conv/Linear/Norm) and the dim that
  holds the channels (class token, positional embedding, layer scale).
* ``pruner``: TP cannot trace through it; it is pruned as one layer by this pruner, and its
  internals are hidden from the tracer.
* ``opaque``: functions of its Python module whose channel permutation TP cannot follow; every
  group whose channels pass through one is left out of the search space, with ``reason``.
* ``after_prune``: re-syncs attributes its ``forward`` reads (e.g. ViT's ``hidden_dim``).
* ``synced``: the size attributes ``pruner`` or ``after_prune`` write beyond the ones TP
  changes (a saved pruned model sets them again when it is loaded).
* ``root``: its own output channels root a group, as a Conv's or a Linear's do (a recurrent
  layer's hidden units).
* ``refused``: why this instance is not pruned ("" where it is); every group reaching its
  output is left out with that reason.
* ``channels_last``: its output (2-D or 3-D) holds its channels in its last dim, as a Linear
  layer's does: the trace reads splits and heads views of it as of a Linear's output.
* ``states``: why a pruned-as-one layer's further outputs (a recurrent layer's final states)
  do not carry its output channels, for this instance ("" where they do); a group reading them
  is left out with that reason.

Nothing here names a model: a ViT-like model built from these layer types is handled the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from . import _companions  # noqa: F401  (installed on import: Conv/Linear per-output state)
from ._broadcast import Cut
from ._buffers import BufferParameter, buffers_as_parameters
from ._dense import DenseLayout, DensePruner, dense_layout
from ._kv_heads import shared_heads
from ._layers import (
    InstanceNormPruner,
    OutputPruner,
    PatchMergingPruner,
    RecurrentPruner,
    WindowAttentionPruner,
)
from ._parametrized import HookStripped, Stripped, restore_parametrizations, strip_parametrizations
from ._shapes import channel_splits_mapped, real_sizes
from ._stored_splits import StoredSplits, split_links, split_size_attributes, write_back_splits
from ._stored_views import (
    FitViews,
    MixedHeads,
    RecordViews,
    Resolved,
    UnfitSize,
    view_size_attributes,
    viewed_layers_tied,
)

ROOT_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.Embedding,  # its width (embedding_dim): what every layer reading it takes in
)
# Layers that stay in eval mode during a training-mode trace: their train-mode behaviour
# changes values (batch statistics, dropout), never which layers run.
_KEEP_EVAL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class Handler:
    heads: Callable[[nn.Module], int] | None = None
    unwrapped: Mapping[str, int] = field(default_factory=dict)
    pruner: Callable[[], tp.pruner.BasePruningFunc] | None = None
    opaque: tuple[str, ...] = ()
    reason: str = ""
    after_prune: Callable[[nn.Module], None] | None = None
    synced: tuple[str, ...] = ()  # the size attributes pruner / after_prune write
    root: bool = False
    refused: Callable[[nn.Module], str] | None = None
    states: Callable[[nn.Module], str] | None = None
    channels_last: bool = False


def _recurrent_refused(rnn: nn.Module) -> str:
    if getattr(rnn, "proj_size", 0):
        return "an LSTM with proj_size is not pruned (its projection is not supported)"
    return ""


def _recurrent_states(rnn: nn.Module) -> str:
    if not rnn.bidirectional:
        return ""  # every layer's final state keeps the output's units (see RecurrentPruner)
    return (
        "it reads the final states of a bidirectional recurrent layer, which hold each "
        "direction's units apart; Torch-Pruning cannot map them to the output's channels "
        "(read the output sequence instead, e.g. output[:, -1], to have it pruned)"
    )


def _sync_vit_hidden_dim(vit: nn.Module) -> None:
    # torchvision's VisionTransformer reshapes patches with self.hidden_dim.
    vit.hidden_dim = int(vit.class_token.shape[-1])


@cache
def handlers() -> dict[type, Handler]:
    """The registry. torchvision is imported on first use only."""
    from torchvision.models import convnext, shufflenetv2, swin_transformer, vision_transformer

    window_attention = Handler(
        heads=lambda m: int(m.num_heads),
        pruner=WindowAttentionPruner,
        reason="Torch-Pruning cannot trace its functional windowed attention, so the layers inside "
        "are pruned only together with the block's embedding channels (head dims shrink, heads kept)",
    )
    merging = (
        "Torch-Pruning cannot map channels through its 2x2 concatenation, so its reduction is "
        "pruned only together with the embedding channels of the stages it joins"
    )
    return {
        nn.MultiheadAttention: Handler(heads=lambda m: int(m.num_heads)),
        nn.modules.instancenorm._InstanceNorm: Handler(pruner=InstanceNormPruner),
        nn.RNNBase: Handler(
            pruner=RecurrentPruner,
            root=True,
            refused=_recurrent_refused,
            states=_recurrent_states,
        ),
        vision_transformer.VisionTransformer: Handler(
            unwrapped={"class_token": 2}, after_prune=_sync_vit_hidden_dim, synced=("hidden_dim",)
        ),
        vision_transformer.Encoder: Handler(unwrapped={"pos_embedding": 2}),
        convnext.CNBlock: Handler(unwrapped={"layer_scale": 0}),
        swin_transformer.ShiftedWindowAttention: window_attention,
        swin_transformer.ShiftedWindowAttentionV2: window_attention,
        swin_transformer.PatchMerging: Handler(
            pruner=PatchMergingPruner, reason=merging, synced=("dim",)
        ),
        swin_transformer.PatchMergingV2: Handler(
            pruner=lambda: PatchMergingPruner(norm_first=False), reason=merging, synced=("dim",)
        ),
        shufflenetv2.InvertedResidual: Handler(
            opaque=("channel_shuffle",),
            reason="its channels pass through channel_shuffle, which interleaves the two "
            "branches; Torch-Pruning cannot map channel indices through it",
        ),
    }


def root_types(model: nn.Module) -> tuple[type, ...]:
    """The layer types whose output channels root groups in ``model``: Conv, Linear, and the
    types whose handler says so (recurrent layers)."""
    return Setup.of(model).root_types()


def synced_attributes(module: nn.Module) -> frozenset[str]:
    """The size attributes ``module``'s handler writes when it prunes (its ``synced``; none
    without a handler), and the split sizes its code reads from an attribute (written back
    after a prune, ``_stored_splits``): a pruned file may set them on this module, not on any
    other."""
    found = handler_for(module)
    if found is None and (layout := dense_layout(module)) is not None:
        found = _dense_handler(layout)
    stored = split_size_attributes(module) | view_size_attributes(module)
    return frozenset(found.synced if found else ()) | stored


def handler_for(module: nn.Module) -> Handler | None:
    """The handler of the nearest registered class in ``module``'s MRO."""
    table = handlers()
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def _dense_handler(layout: DenseLayout) -> Handler:
    return Handler(
        pruner=partial(DensePruner, layout),
        root=True,
        channels_last=True,
        synced=layout.out_attrs + layout.in_attrs,
    )


def _dense_handlers(model: nn.Module, known: Container[str]) -> dict[str, Handler]:
    """Handlers of the dense layers Torch-Pruning does not know (search_space/_dense.py), for
    types whose every instance in ``model`` is one, stored alike: TP hooks every instance of a
    customized type with its one pruner."""
    layouts: dict[type, set[DenseLayout | None]] = {}
    found: dict[str, DenseLayout] = {}
    for name, m in model.named_modules():
        if name in known:
            continue
        layout = dense_layout(m)
        layouts.setdefault(type(m), set()).add(layout)
        if layout is not None:
            found[name] = layout
    modules = dict(model.named_modules())
    return {
        n: _dense_handler(layout)
        for n, layout in found.items()
        if len(layouts[type(modules[n])]) == 1
    }


# -- tracing helpers -----------------------------------------------------------------------
class _Opaque(torch.autograd.Function):
    """A tracing-only node: its value is precomputed; its only graph edges go to ``inputs``.

    TP follows ``grad_fn.next_functions``; routing a layer's output through this node hides
    everything between its inputs and its output from the tracer.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        raise RuntimeError(
            "an opaque tracing node was differentiated; it only exists while tracing"
        )


def _opaque(value: Any, inputs: list[torch.Tensor]) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    linked = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return _Opaque.apply(value.detach(), *linked)


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    elif _is_record(value):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten(v)]
    return []


@contextlib.contextmanager
def structural_train_mode(model: nn.Module) -> Iterator[None]:
    """Training mode for the layers whose ``forward`` branches on it (auxiliary heads).

    Normalisation layers stay in eval mode, so no running statistic changes and a batch of
    one still works.
    """
    before = {m: m.training for m in model.modules()}
    try:
        for m in model.modules():
            m.training = not isinstance(m, _KEEP_EVAL)
        yield
    finally:
        for m, mode in before.items():
            m.training = mode


# -- the TP setup of one model ---------------------------------------------------------------
@dataclass
class Setup:
    """Everything TP needs for ``model``, rebuilt from the model alone (plans stay plain)."""

    model: nn.Module
    train_mode: bool = False
    handlers: dict[str, Handler] = field(default_factory=dict)  # module name -> its handler
    barriers: dict[Any, str] = field(default_factory=dict)  # opaque grad_fn -> reason (last trace)
    ran: set[str] = field(default_factory=set)  # the layers the last trace ran
    cut: Cut | None = None  # the trace's one-channel maps (search_space/_broadcast.py)
    # The outputs of each call of a root layer in the last trace.
    made: list[list[torch.Tensor]] = field(default_factory=list)
    # Layer -> the heads its tokens were viewed as in the last trace (hand-written attention).
    viewed_heads: dict[str, int] = field(default_factory=dict)
    # What is taken off while a pruner works on the model (``strip``): parametrizations
    # (see _parametrized), buffers made parameters (see _buffers).
    stripped: list[Stripped | HookStripped | BufferParameter] = field(default_factory=list)
    # Split sizes a module attribute holds: by the split's autograd node (the last trace), and
    # the pruner's split ops linked to them, written back after each step (_stored_splits).
    stored_splits: dict[Any, tuple[str, str]] = field(default_factory=dict)
    split_links: list[tuple[Any, tuple[str, str]]] = field(default_factory=list)
    inputs: Any = None  # the pruner's example inputs: a pruned model runs them to refit its views
    resolved_views: dict[Any, Resolved] = field(default_factory=dict)  # (RecordViews)

    @classmethod
    def of(cls, model: nn.Module, *, train_mode: bool = False) -> Setup:
        found = {n: h for n, m in model.named_modules() if (h := handler_for(m)) is not None}
        return cls(model, train_mode, found | _dense_handlers(model, found))

    def _modules(self) -> dict[str, nn.Module]:
        return dict(self.model.named_modules())

    def root_types(self) -> tuple[type, ...]:
        """Conv and Linear layers, and the types whose handler roots groups (recurrent)."""
        modules = self._modules()
        extra = {type(modules[n]) for n, h in self.handlers.items() if h.root}
        return ROOT_TYPES + tuple(sorted(extra - set(ROOT_TYPES), key=lambda t: t.__name__))

    def leaves(self) -> dict[str, Handler]:
        return {n: h for n, h in self.handlers.items() if h.pruner is not None}

    def channel_groups(self) -> dict[str, int]:
        modules = self._modules()
        return {n: h.heads(modules[n]) for n, h in self.handlers.items() if h.heads is not None}

    def unwrapped(self) -> dict[str, int]:
        """Parameter name -> channel dim, for parameters TP cannot attribute to a layer.

        Registered attributes use their stated dim; any other unwrapped parameter uses TP's
        default (its last dim larger than one).
        """
        out: dict[str, int] = {}
        for name, handler in self.handlers.items():
            for attr, dim in handler.unwrapped.items():
                out[f"{name}.{attr}" if name else attr] = dim
        params = dict(self.model.named_parameters())
        for name in self._unattributed(params):
            if name not in out and (dims := [i for i, s in enumerate(params[name].shape) if s > 1]):
                out[name] = dims[-1]
        return {n: d for n, d in out.items() if n in params}

    def _unattributed(self, params: Mapping[str, nn.Parameter]) -> list[str]:
        """TP's own rule: a parameter is wrapped if a layer TP prunes (or a leaf) owns it."""
        prunable = set(tp.pruner.function.PrunerBox) - {tp.ops.OPTYPE.PARAMETER}
        leaves = self.leaves()
        owned: set[int] = set()
        for name, m in self.model.named_modules():
            if tp.ops.module2type(m) in prunable or name in leaves:
                owned.update(id(p) for p in m.parameters())
        return [n for n, p in params.items() if id(p) not in owned]

    # -- what BasePruner / DependencyGraph take -------------------------------------------
    def customized_pruners(self) -> dict[type, tp.pruner.BasePruningFunc]:
        # TP keys customized pruners by exact type (it hooks every instance of the type).
        modules = self._modules()
        return {tp.ops._OutputOp: OutputPruner()} | {
            type(modules[n]): h.pruner() for n, h in self.leaves().items()
        }

    def unwrapped_parameters(self) -> list[tuple[nn.Parameter, int]]:
        params = dict(self.model.named_parameters())
        return [(params[n], d) for n, d in self.unwrapped().items()]

    def forward_fn(self) -> Callable[[nn.Module, Any], Any]:
        """The model's call for a trace, in training mode if so traced; with the one-channel
        maps the trace detached (``Cut.outputs``) as further outputs, so their layers are
        traced."""

        def forward(model: nn.Module, example_inputs: Any) -> Any:
            with structural_train_mode(model) if self.train_mode else contextlib.nullcontext():
                out = call_model(model, example_inputs)
            if self.cut is None:
                return _traceable(out)
            out = _map_tensors(out, self.cut.undo)
            extra = [*self.cut.outputs(), *self._dead_ends(out)]
            return (_traceable(out), *extra) if extra else _traceable(out)

        return forward

    def _dead_ends(self, out: Any) -> list[torch.Tensor]:
        """What the model computed but none of its outputs was made from (a last block's
        residual sum, ``x + res(z)``, that nothing reads), each summed to one value, as further
        outputs of the trace: Torch-Pruning traces back from the outputs, so it missed those
        layers, and the groups feeding them were cut with their inputs left whole (the dry run
        failed: "expected input ... to have 16 channels, but got 12"). The last such results,
        not the layers' own outputs: the sum ties ``res``'s channels to the stream ``x``'s,
        which a plan cutting the two unalike broke."""
        reached = set(walk_back([t.grad_fn for t in (*flatten(out), *self.cut.maps)]))
        # A layer reached by any of its outputs is traced (an LSTM's final states may go unread).
        dead = {
            t.grad_fn: t
            for made in self.made
            if not any(t.grad_fn in reached for t in made)
            for t in made
            if t.grad_fn is not None
        }
        # And what the model made of them that nothing read (not the internals of a layer
        # pruned as one, which run before its outputs).
        dead |= {
            t.grad_fn: t
            for t in self.cut.results
            if t.grad_fn not in reached
            and any(n in dead for n in walk_back([t.grad_fn], stop=reached))
        }
        # Only the last of them: what a later one was made from is traced through its sum.
        inner = set(walk_back((n for node in dead for n, _ in node.next_functions), reached))
        unread = {node: t for node, t in dead.items() if node not in inner}
        self.cut.off = True  # the sums are the trace's own
        try:
            return [t.sum() for t in unread.values()]
        finally:
            self.cut.off = False

    def pruner_kwargs(self) -> dict[str, Any]:
        modules = self._modules()
        groups = {modules[n]: g for n, g in self.channel_groups().items()}
        return {
            # Fresh dicts always: BasePruner's defaults are shared mutable dicts it writes to.
            "in_channel_groups": dict(groups),
            "out_channel_groups": dict(groups),
            "num_heads": {},
            "customized_pruners": self.customized_pruners(),
            "unwrapped_parameters": self.unwrapped_parameters(),
            "forward_fn": self.forward_fn(),
        }

    def pruner(
        self,
        example_inputs: Any,
        importance: tp.importance.Importance,
        ratios: Mapping[Any, float],
        ignored: list[nn.Module],
        *,
        cls: type[tp.pruner.BasePruner] = tp.pruner.BasePruner,
        slices: Mapping[nn.Module, int] | None = None,
        default_ratio: float = 0.0,
        **options: Any,
    ) -> tp.pruner.BasePruner:
        """A BasePruner that prunes only the groups in ``ratios`` (keys: a root layer, or a
        tuple of root layers sharing one ratio); ``options`` are BasePruner's own. ``cls`` may
        be a subclass (a regularising pruner for sparse training) and ``options`` its extras.
        ``slices``: root layer -> the equal slices its group is cut in (``PrunableGroup.split``):
        the pruner finds grouped convs, GroupNorm and heads itself, not channels tied by the
        model's own ops (``tied_slices``). ``default_ratio``: the ratio of groups neither in
        ``ratios`` nor ``ignored`` (isomorphic pruning ranks only those in its own scopes)."""
        self._record_views(example_inputs)
        self.stripped += self.strip()  # until restore()
        kwargs = self.pruner_kwargs()
        for root, k in (slices or {}).items():
            kwargs["out_channel_groups"][root] = max(k, kwargs["out_channel_groups"].get(root, 1))
        with self.tracing(), torch.enable_grad():
            pruner = cls(
                self.model,
                example_inputs,
                importance=importance,
                pruning_ratio=default_ratio,  # 0: groups outside ``ratios`` stay whole
                pruning_ratio_dict=dict(ratios),
                ignored_layers=ignored,
                root_module_types=list(self.root_types()),
                **kwargs,
                **options,
            )
        _ratio_own_roots(pruner, ratios, self.root_types())
        self.split_links = split_links(pruner.DG, self.stored_splits)
        self.inputs = example_inputs
        return pruner

    def output_shapes(self, example_inputs: Any) -> list[tuple[int, ...]]:
        """Shapes of every output, in eval mode and (if traced so) in training mode."""
        with torch.no_grad():
            outs = [call_model(self.model, example_inputs)]
            if self.train_mode:
                with structural_train_mode(self.model):
                    outs.append(call_model(self.model, example_inputs))
        return [tuple(t.shape) for t in flatten(outs)]

    def strip(self) -> list[Stripped | HookStripped | BufferParameter]:
        """Take off what Torch-Pruning cannot see through (parametrizations: weight_norm) or
        cannot see (per-value buffers, made parameters: search_space/_buffers.py), for one
        graph or one pruning; each item's ``restore`` puts it back, on the pruned tensors."""
        modules = self._modules()
        leaves = [modules[n] for n in self.leaves()]
        return strip_parametrizations(self.model) + buffers_as_parameters(self.model, leaves)

    def build_graph(self, example_inputs: Any) -> tp.DependencyGraph:
        stripped = self.strip()
        try:
            with self.tracing(), torch.enable_grad():  # DepGraph traces through autograd
                return tp.DependencyGraph().build_dependency(
                    self.model,
                    example_inputs=example_inputs,
                    forward_fn=self.forward_fn(),
                    unwrapped_parameters=self.unwrapped_parameters(),
                    customized_pruners=self.customized_pruners(),
                    verbose=False,
                )
        finally:
            restore_parametrizations(stripped)

    def restore(self) -> None:
        """Put back the parametrizations ``pruner`` took off, on the pruned weights: call once
        every step has run (a trial's finetune then trains what the base model trains)."""
        restore_parametrizations(self.stripped)
        self.stripped = []

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Hide the internals of pruned-as-one layers and route opaque functions through
        barrier nodes, for the duration of one trace."""
        self.barriers, self.ran = {}, set()
        modules = self._modules()
        hooks = [
            modules[n].register_forward_hook(_Hider(h, self.barriers, lambda: self.cut))
            for n, h in self.leaves().items()
        ]
        hooks += [
            m.register_forward_hook(lambda *_, n=n: self.ran.add(n)) for n, m in modules.items()
        ]
        self.made = []
        roots = self.root_types()
        hooks += [
            m.register_forward_hook(lambda _m, _a, out: self.made.append(flatten(out)))
            for m in modules.values()
            if isinstance(m, roots)
        ]
        with contextlib.ExitStack() as stack:
            stack.enter_context(all_trainable(self.model))
            stack.enter_context(real_sizes(self.barriers, _opaque))
            stack.enter_context(channel_splits_mapped())
            stack.enter_context(_glu_as_chunks())
            stack.enter_context(_every_recurrent_type_known())
            self.cut = stack.enter_context(Cut())
            # Inside the Cut: the ops it writes attention as are the Cut's to see.
            stack.enter_context(shared_heads(self.cut.keep))
            for owner, fname, reason in self._opaque_functions():
                stack.enter_context(_patched(owner, fname, reason, self.barriers))
            # Innermost: they see the sizes as the model's code passed them.
            splits = stack.enter_context(StoredSplits(self.model))
            stack.enter_context(viewed_layers_tied(self.model, roots))
            try:
                yield
            finally:
                self.stored_splits = splits.seen
                self.made = []
                self.viewed_heads = self._viewed_heads(self.cut.heads) if self.cut.heads else {}
                self.cut = None  # a call of forward_fn after the trace has no maps to add
                for h in hooks:
                    h.remove()

    def _viewed_heads(self, heads: Mapping[int, tuple[torch.Tensor, int]]) -> dict[str, int]:
        """``Cut.heads`` (by weight) by the name of the layer each weight belongs to."""
        weights = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        return {weights[i].rpartition(".")[0]: h for i, (_, h) in heads.items() if i in weights}

    def _opaque_functions(self) -> list[tuple[Any, str, str]]:
        seen: dict[tuple[str, str], tuple[Any, str, str]] = {}
        modules = self._modules()
        for name, h in self.handlers.items():
            owner = sys.modules[type(modules[name]).__module__]
            for fname in h.opaque:
                seen.setdefault((owner.__name__, fname), (owner, fname, h.reason))
        return list(seen.values())

    def after_prune(self) -> None:
        for item in self.stripped:
            if isinstance(item, BufferParameter):
                item.freeze()
        modules = self._modules()
        for name, h in self.handlers.items():
            if h.after_prune is not None:
                h.after_prune(modules[name])
        write_back_splits(self.model, self.split_links)
        self._fit_views()

    def _fit_views(self) -> None:
        """Run the pruned model once so that reshapes by stored sizes refit them and heads of a
        literal width are checked (``_stored_views``); only where the model ran such a view
        before the prune (``_record_views``): one with none (most convnets) pays no forward
        here. A forward that fails for another reason is left to the caller's own check of the
        pruned model, which says why."""
        if self.inputs is None or not self.resolved_views:
            return
        # Run until a run refits nothing: a stored size is one attribute, so each view reading
        # it, earlier in the forward too, must view as before; and a forward that failed after
        # a refit (at a view by a local read before it, DistilBERT's ``dim_per_head``) is run
        # again to reach the layers after. Each run refits at least one call, else stops.
        for _ in range(len(self.resolved_views) + 1):
            fit = self._run_fitting()
            if fit.mixed:
                raise MixedHeads(*fit.mixed[0])
            if fit.unfit:  # the likelier cause of a failed forward too: it names the line
                raise UnfitSize(*fit.unfit[0])
            if not fit.refitted:
                return
        raise UnfitSize(*fit.refitted[0])

    def _run_fitting(self) -> FitViews:
        # A forward that fails is reported by the caller's own forward, or by the views it met.
        fit = FitViews(self.model, self.resolved_views)
        with torch.no_grad(), fit, contextlib.suppress(Exception):
            call_model(self.model, self.inputs)
        return fit

    def _record_views(self, example_inputs: Any) -> None:
        """Before a prune: how each reshape by stored sizes or of heads resolved its ``-1``
        (FitViews keeps a head count so, or says the prune changed it), on the inputs the
        pruned model will run."""
        self.resolved_views = {}
        with torch.no_grad(), RecordViews(self.model) as record:
            try:
                call_model(self.model, example_inputs)
            except Exception:  # noqa: BLE001 - the trace that follows says what is wrong
                return
        self.resolved_views = record.resolved


class _Hider:
    """A forward hook that hides a pruned-as-one layer's internals from the tracer.

    Its first output (TP's own rule: ``outputs[0]``, a PackedSequence's data) is linked to its
    inputs and parameters only. Its further outputs (a recurrent layer's final states) are
    linked to that first output, so TP reads their channels as the layer's own; where they do
    not carry them (``Handler.states``), or the layer is refused, the link is a barrier.
    """

    def __init__(
        self, handler: Handler, barriers: dict[Any, str], cut: Callable[[], Cut | None]
    ) -> None:
        self.handler, self.barriers, self.cut = handler, barriers, cut

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        first = next(iter(flatten(output)), None)
        if first is None:
            return output
        refused = self.handler.refused(module) if self.handler.refused else ""
        states = self.handler.states(module) if self.handler.states else ""
        main = self._link(first, flatten(list(args)) + list(module.parameters()), refused)
        if self.handler.channels_last and (cut := self.cut()) is not None:
            cut.made_by(main, module.weight)

        def swap(t: torch.Tensor) -> torch.Tensor:
            if t is first:
                return main
            if not t.is_floating_point():  # a PackedSequence's batch sizes
                return t
            return self._link(t, [main], refused or states)

        return _map_tensors(output, swap)

    def _link(self, value: torch.Tensor, inputs: list[torch.Tensor], reason: str) -> Any:
        out = _opaque(value, inputs)
        if reason and out.grad_fn is not None:
            self.barriers[out.grad_fn] = reason
        return out


def _ratio_own_roots(
    pruner: tp.pruner.BasePruner, ratios: Mapping[Any, float], roots: tuple[type, ...]
) -> None:
    """Give the root layers of our own pruners (dense layers: search_space/_dense.py) their
    ratios, as BasePruner gives its own layer types theirs: it reads ``pruning_ratio_dict``
    for those types only, so such a group kept every channel whatever its plan said. Scopes
    named as BasePruner names them: one per key when ranked globally, one per layer if not."""
    for i, (key, ratio) in enumerate(ratios.items()):
        scope = key if isinstance(key, tuple) else [key]
        layers = [s for m in scope for s in m.modules() if isinstance(s, roots)]
        for j, layer in enumerate(x for x in layers if x not in pruner.pruning_ratio_dict):
            name = f"_User_Defined_Scope_{i}" + ("" if pruner.global_pruning else f"_own{j}")
            pruner._layer_to_scope[layer] = (name, scope)
            steps = pruner.iterative_pruning_ratio_scheduler(ratio, pruner.iterative_steps)
            pruner.pruning_ratio_dict[layer] = steps


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to each tensor; tuples (named ones included), lists and
    dicts keep their types."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return type(value)((k, _map_tensors(v, fn)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple: PackedSequence
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if _is_record(value):
        fields = [f.name for f in dataclasses.fields(value) if f.init]
        return dataclasses.replace(
            value, **{k: _map_tensors(getattr(value, k), fn) for k in fields}
        )
    return value


def _is_record(value: Any) -> bool:
    """A dataclass instance that is no dict: a model library's output class (``logits``, ...)."""
    return dataclasses.is_dataclass(value) and not isinstance(value, (type, dict))


def _traceable(out: Any) -> Any:
    """``out`` as Torch-Pruning can walk it, its tensors in order: it finds them in tuples,
    lists and dicts only, failed on a dataclass output ("'Output' object is not iterable") and
    took any other leaf for a tensor (a language model's key/value cache: "'tuple' object has
    no attribute 'grad_fn'")."""
    if isinstance(out, torch.Tensor):
        return out
    tensors = tuple(flatten(out))
    if not tensors:  # a list of floats (``.tolist()``): nothing computed to trace back from
        raise TypeError(f"the model's output holds no tensor (a {type(out).__name__})")
    return tensors


@contextlib.contextmanager
def _patched(owner: Any, fname: str, reason: str, barriers: dict[Any, str]) -> Iterator[None]:
    original = getattr(owner, fname)

    def opaque(*args: Any, **kwargs: Any) -> Any:
        out = _opaque(original(*args, **kwargs), [a for a in args if isinstance(a, torch.Tensor)])
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            barriers[out.grad_fn] = f"{reason} ({fname})"
        return out

    setattr(owner, fname, opaque)
    try:
        yield
    finally:
        setattr(owner, fname, original)


@contextlib.contextmanager
def _every_recurrent_type_known() -> Iterator[None]:
    """Let TP take a GRU or a plain RNN for a layer of its own, as it takes an LSTM.

    TP 1.6 records the widths its ratios apply to (and which layers a ratio covers) only for
    layer types it registers; of the recurrent ones that is ``nn.LSTM``. While a graph or a
    pruner is built, every ``nn.RNNBase`` counts as that type; its pruner stays ours
    (customized pruners come first), and nothing after construction reads the type.
    """
    original = tp.ops.TORCH_LSTM
    tp.ops.TORCH_LSTM = nn.RNNBase
    try:
        yield
    finally:
        tp.ops.TORCH_LSTM = original


@contextlib.contextmanager
def _glu_as_chunks() -> Iterator[None]:
    """Trace ``glu`` (``nn.GLU``, ``F.glu``) as what it computes, a chunk in two and a product.

    TP takes the glu op for an elementwise one (channel i in, channel i out), which breaks a
    model pruned through it; as a chunk and a product, the input's halves are tied channel by
    channel, and discovery cuts the layer before it in two slices (``tied_slices``)."""
    functional = torch.nn.functional
    original = functional.glu

    def glu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
        a, b = input.chunk(2, dim=dim)
        return a * torch.sigmoid(b)

    functional.glu = glu
    try:
        yield
    finally:
        functional.glu = original


def walk_back(nodes: Iterable[Any], stop: Container[Any] = ()) -> Iterator[Any]:
    """Each autograd node reached from ``nodes`` through ``next_functions``, once; a node in
    ``stop`` is yielded but not gone past."""
    seen, todo = set(), list(nodes)
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        if node not in stop:
            todo.extend(n for n, _ in node.next_functions)


@contextlib.contextmanager
def all_trainable(model: nn.Module) -> Iterator[None]:
    """Every floating parameter requires grad while Torch-Pruning traces (through autograd): a
    frozen layer (a transfer-learning backbone) left no node, and was left out as never run."""
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
