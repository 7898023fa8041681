"""Chunks, concatenations and reshapes, as Torch-Pruning's shape inference should see them.

- Recent PyTorch saves ``_saved_self_sym_sizes`` for ``chunk`` where Torch-Pruning 1.6 reads
  ``_saved_self_sizes``, so it guessed a chunk's sizes from its readers, wrongly when a chunk
  feeds a concatenation (ShuffleNetV2), and not at all where a reader is no layer (q and k of
  a fused ``qkv(x).chunk(3, -1)`` meet in attention scores): the real sizes are given to it.
- A concatenation of one tensor's chunks in another order (a rotary embedding's
  ``rotate_half``, ``torch.cat([-x2, x1], -1)``) moves channels. Torch-Pruning could not size
  the negated chunk and the whole model failed to trace ("unsupported operand type(s) for +:
  'int' and 'NoneType'"); given the sizes, its index mapping through the split and back grew
  without end (a two-block Llama-style model's groups ran for over ten minutes). Such a
  concatenation is traced as one opaque op on what was chunked, a barrier: the groups through
  it are left out, with why, and the rest of the model (its MLPs, its residual stream) is
  searched. The same holds where the halves are sliced (Hugging Face's
  ``x[..., : d // 2]``).
- Torch-Pruning's maps into a concatenation and back out of a split or a slice are open: an
  index past a piece's width, sent round a loop of the graph, came back shifted, so a walk
  could go on without end (a Hugging Face Llama, whose one rotary table every layer reads). An
  index past the width of the piece it maps from is dropped (``_bound_index_maps``).
- Torch-Pruning turns off the index mapping of every split and concatenation fed by a 3-D
  parameter (its fix for a ViT's class token, concatenated along the tokens), so a learned
  positional embedding anywhere before a fused ``qkv(x).chunk(3, -1)`` had the three parts'
  channels mapped as if unsplit, and the projection was left out. A split along the last dim
  of a tensor of up to 3 dims (tokens' channels) is mapped again (``channel_splits_mapped``).
- Torch-Pruning guesses a concatenation's piece sizes from the layers around it and failed the
  whole trace where it could not (timm's DPN: deep chains of concatenated slices; a key cache
  started from an empty tensor, which ``cat`` skips); the sizes the trace saw are given to it
  (``_size_concat``). A concatenation along a dim that holds no layer's channels (neither 1
  nor the last: a key cache joined along the positions) is not mapped: its pieces keep their
  channels where they are. Torch-Pruning takes a negative dim for "any" and mapped them.
- Torch-Pruning gave every reshape a flatten map where a later layer takes in a multiple of
  the channels before it (its own size check reads a name PyTorch no longer saves); a 4-D to
  4-D reshape by heads (EfficientViT) sent indices round its loops without end. A flatten map
  stands only where the traced sizes fold dims into dim 1 by its stride (``_misread_flatten``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch_pruning as tp
from torch.overrides import TorchFunctionMode

_CONCATS = frozenset({torch.cat, torch.concat, torch.concatenate})
_SPLITS = frozenset({torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split})
_SLICES = frozenset({torch.Tensor.__getitem__, torch.narrow, torch.Tensor.narrow})
_RESHAPES = frozenset(
    {
        torch.reshape,
        torch.Tensor.reshape,
        torch.Tensor.view,
        torch.flatten,
        torch.Tensor.flatten,
        torch.unflatten,
        torch.Tensor.unflatten,
    }
)
# Keys of an autograd node's metadata: a reshape's (input, output) sizes; a concatenation's
# pieces' sizes along its dim, and whether that dim is one no layer holds channels in.
_RESHAPE_SIZES, _CAT_SIZES = "prunesearch.reshape_sizes", "prunesearch.cat_sizes"
_CAT_ACROSS = "prunesearch.cat_across"


# Ops that keep one input's channels where they are, walked through to find a chunk.
_UNARY = frozenset(
    {"NegBackward0", "MulBackward0", "DivBackward0", "CloneBackward0", "ToCopyBackward0"}
)
MOVED_REASON = (
    "its channels pass through a concatenation of one tensor's chunks (or slices) in another "
    "order (rotate_half, as a rotary embedding does), which moves them where Torch-Pruning "
    "cannot follow, so it is not pruned"
)


class _Reordered(TorchFunctionMode):
    """Makes a concatenation of a tensor's chunks in another order a barrier: ``opaque`` on
    what was chunked, its node in ``barriers`` with why. Notes on the autograd nodes of other
    concatenations and of reshapes the sizes they saw (``_CAT_SIZES``, ``_RESHAPE_SIZES``)."""

    def __init__(self, barriers: dict[Any, str], opaque: Callable[[Any, list], Any]) -> None:
        super().__init__()
        self.barriers, self.opaque = barriers, opaque
        self.chunked: dict[Any, torch.Tensor] = {}  # a split's autograd node -> what it split

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _RESHAPES and getattr(out, "grad_fn", None) is not None:
            out.grad_fn.metadata[_RESHAPE_SIZES] = (tuple(args[0].shape), tuple(out.shape))
        if func in _SPLITS and out and getattr(out[0], "grad_fn", None) is not None:
            self.chunked[out[0].grad_fn] = args[0]
        if func in _SLICES and _last_dim_slice(getattr(out, "grad_fn", None)):
            # HF's rotate_half halves by slicing (``x[..., : d // 2]``), not by chunk.
            self.chunked.setdefault(out.grad_fn.next_functions[0], args[0])
        if func in _CONCATS and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            tensors = list(args[0] if args else kwargs.get("tensors", kwargs.get("arrays", ())))
            split = _reordered_chunks(tensors)
            if split is not None and split in self.chunked:
                # Linked to what was chunked, not to the chunks: Torch-Pruning's mapping
                # through the split and back is what grew without end.
                out = self.opaque(out, [self.chunked[split]])
                self.barriers[out.grad_fn] = MOVED_REASON
                return out
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if (sizes := _cat_sizes(tensors, dim)) is not None:
                out.grad_fn.metadata[_CAT_SIZES] = sizes
                # Channels are dim 1 or the last (a conv's, a Linear's): a key cache's
                # concatenation along the positions of (B, heads, T, head dim) is neither.
                out.grad_fn.metadata[_CAT_ACROSS] = dim % out.dim() not in (1, out.dim() - 1)
        return out


def _cat_sizes(tensors: list[Any], dim: Any) -> list[int] | None:
    """The pieces' sizes along ``dim``: 0 for an empty 1-D tensor, which ``cat`` skips (a
    key/value cache's first step starts from one); None where a piece has no such dim."""
    if not isinstance(dim, int) or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    if not all(-t.dim() <= dim < t.dim() or t.shape == (0,) for t in tensors):
        return None
    return [0 if t.shape == (0,) else int(t.shape[dim]) for t in tensors]


def _last_dim_slice(fn: Any) -> bool:
    """Whether the autograd node ``fn`` sliced a tensor that needs grad along its last dim."""
    if type(fn).__name__ != "SliceBackward0" or fn.next_functions[0][0] is None:
        return False
    return signed(fn._saved_dim) in (-1, len(fn._saved_self_sym_sizes) - 1)


def _chunk_of(t: torch.Tensor) -> tuple[Any, int] | None:
    """What ``t`` is a piece of (through ``_UNARY`` ops) and where: a split node and its output
    index, or a sliced tensor's (node, output) and the slice's start; or None."""
    fn, nr = t.grad_fn, t.output_nr
    while fn is not None and type(fn).__name__ in _UNARY:
        edges = [(f, i) for f, i in fn.next_functions if f is not None]
        if len(edges) != 1:
            return None
        fn, nr = edges[0]
    if _last_dim_slice(fn):
        size = int(fn._saved_self_sym_sizes[-1])
        start = fn._saved_start if fn._saved_start is not None else 0
        return fn.next_functions[0], signed(start) % max(size, 1)
    return (fn, nr) if fn is not None and type(fn).__name__.startswith("Split") else None


def _reordered_chunks(tensors: list[torch.Tensor]) -> Any:
    """The split node (or sliced tensor's), where ``tensors`` are chunks (slices) of one tensor
    in another order; or None."""
    found = [_chunk_of(t) if isinstance(t, torch.Tensor) else None for t in tensors]
    if len(found) < 2 or None in found or len({fn for fn, _ in found}) != 1:
        return None
    order = [nr for _, nr in found]
    return found[0][0] if order != sorted(order) else None


@contextlib.contextmanager
def real_sizes(barriers: dict[Any, str], opaque: Callable[[Any, list], Any]) -> Iterator[None]:
    """While a model is traced: give Torch-Pruning's shape inference the real sizes of chunks,
    and trace chunks put back in another order through ``opaque``, into ``barriers`` with why
    (see the module)."""
    shape_infer = tp.dependency.shape_infer
    original = shape_infer.init_shape_information
    reordered = _Reordered(barriers, opaque)

    def init_shape_information(graph: tp.DependencyGraph) -> None:
        original(graph)
        for node in graph.module2node.values():
            if node.type == tp.ops.OPTYPE.SPLIT:
                _size_chunks(node)
            if node.type == tp.ops.OPTYPE.CONCAT and node.module.concat_sizes is None:
                _size_concat(node)

    shape_infer.init_shape_information = init_shape_information
    try:
        with reordered:
            yield
    finally:
        shape_infer.init_shape_information = original


def _bound_index_maps() -> None:
    """Bound the index maps Torch-Pruning leaves open: into a concatenation, back out of a
    split or a slice. Its walk of a group goes on while it meets indices it has not seen; a
    channel past a piece's width, sent round a loop of the graph (a rotary table
    ``cat((f, f))`` that every layer's q and k read), came back shifted each time, and a
    two-layer Hugging Face Llama's discovery ran without end. Such an index names no channel;
    it is dropped. Installed once, for the process: TP re-derives every map each time a group
    is asked for (``get_pruning_group``), long after any trace of ours has ended."""
    mappings = tp.dependency.index_mapping
    original = mappings.update_index_mapping
    if getattr(original, "bounded", False):
        return

    def update_index_mapping(graph: tp.DependencyGraph) -> None:
        _split_offsets(graph)
        original(graph)
        for node in graph.module2node.values():
            for dep in node.dependencies:
                dep.index_mapping[:] = [_bounded(m) for m in dep.index_mapping]
                if _misread_flatten(dep):
                    dep.index_mapping[0] = tp.dependency.constants.INDEX_MAPPING_PLACEHOLDER

    update_index_mapping.bounded = True  # type: ignore[attr-defined]
    mappings.update_index_mapping = update_index_mapping


def _split_offsets(graph: tp.DependencyGraph) -> None:
    """Each split's offsets from its sizes as they are now. TP's pruner of a split updates its
    sizes and writes the new offsets to itself, not to the split; the maps, derived again for
    each group from the split's offsets, put the next group's channels of a piece at the
    piece's old place (a split by sizes whose pieces are pruned as groups of their own: the
    second piece's depthwise conv cut, its input not)."""
    for node in graph.module2node.values():
        sizes = (
            getattr(node.module, "split_sizes", None) if node.type == tp.ops.OPTYPE.SPLIT else None
        )
        if sizes and all(isinstance(s, int) for s in sizes):
            node.module.offsets = [0, *itertools.accumulate(sizes)]


def _bounded(mapping: Any) -> Any:
    """``mapping``, dropping the indices past the width of the piece it maps from."""
    im = tp.dependency.index_mapping
    into = isinstance(mapping, im._ConcatIndexMapping) and not mapping.reverse
    if into or (isinstance(mapping, im._SplitIndexMapping) and mapping.reverse):
        offset = list(mapping.offset)
        if len(offset) < 2 or not all(isinstance(o, int) for o in offset[:2]):
            return mapping  # a piece TP could not size (GPT-NeoX): its own map stands
        width = offset[1] - offset[0]
    elif isinstance(mapping, im._SliceIndexMapping) and mapping.reverse:
        start, end, step = (int(v) for v in (mapping.start, mapping.end, mapping.step))
        if not 0 <= start < end or step < 1:  # saved unsigned or open: TP's own map stands
            return mapping
        width = -(-(end - start) // step)
    else:
        return mapping
    return _Within(mapping, width)


def _misread_flatten(dep: Any) -> bool:
    """Whether ``dep`` holds the flatten map TP gave a reshape that is no such flatten.

    TP 1.6 reads a reshape as a flatten (channel i to i * stride .. i * stride + stride - 1)
    wherever a later layer takes in a multiple of the channels before it; its check that the
    input is 4-D with C x H x W matching reads ``_saved_self_sizes``, which PyTorch now saves as
    ``_saved_self_sym_sizes``, so it never ran. EfficientViT's attention (a 4-D to 4-D
    ``reshape`` of its fused qkv, and the matmuls' own reshapes) got such maps, and indices
    sent round the model's loops grew by the stride at each pass: its discovery never ended.
    A map stands where the reshape folds dims into dim 1 by that stride (a flatten, a maxout's
    channel pairs) or unfolds them, as the trace saw it (``_RESHAPE_SIZES``) or, for a reshape
    the trace did not see, as PyTorch saved its input; otherwise it gets the map TP gives every
    other reshape, none, and the route check and the dry run judge the groups through it."""
    mapping = dep.index_mapping[0]
    if not isinstance(mapping, tp.dependency.index_mapping._FlattenIndexMapping):
        return False
    ends = [n for n in (dep.source, dep.target) if n.type == tp.ops.OPTYPE.RESHAPE]
    return any(not _flattens(n.grad_fn, int(mapping._stride)) for n in ends)


def _flattens(fn: Any, stride: int) -> bool:
    """Whether the reshape autograd node ``fn`` flattens C x H.. into dim 1 by ``stride`` (or
    unflattens it), as far as is known; True where nothing is known (TP's map stands)."""
    recorded = fn.metadata.get(_RESHAPE_SIZES) if fn is not None else None
    if recorded is not None:
        before, after = recorded
        return _folds(before, after, stride) or _folds(after, before, stride)
    before = getattr(fn, "_saved_self_sym_sizes", None)
    if before is None:
        return True
    before = tuple(int(s) for s in before)
    return len(before) == 4 and stride == math.prod(before[2:])  # TP's own rule


def _folds(before: tuple[int, ...], after: tuple[int, ...], stride: int) -> bool:
    """Whether ``after``'s dim 1 is ``before``'s dims 1..k-1 folded together, ``stride`` apart:
    a flatten (k = len(before)), or a maxout's view of channel pairs, read from the other side."""
    for k in range(2, len(before) + 1):
        if (
            len(after) > 1
            and after[1] == math.prod(before[1:k])
            and stride == math.prod(before[2:k])
        ):
            return True
    return False


class _Within:
    """An index map that first drops indices at or past ``width``."""

    def __init__(self, mapping: Any, width: int) -> None:
        self.mapping, self.width = mapping, width
        self.reverse = mapping.reverse

    def __call__(self, idxs: list) -> list:
        return self.mapping([i for i in idxs if 0 <= i.idx < self.width])


def _size_chunks(node: Any) -> None:
    """A chunk's sizes from what PyTorch saves now (``_saved_self_sym_sizes``); a split by
    sizes (``split_with_sizes``, which TP sizes itself) gets its readers in the pieces' order."""
    fn = node.grad_fn
    if hasattr(fn, "_saved_split_sizes"):
        if node.module.split_sizes is not None:
            _readers_in_order(node, len(node.module.split_sizes))
        return
    if not hasattr(fn, "_saved_split_size"):
        return
    sizes, dim = getattr(fn, "_saved_self_sym_sizes", None), signed(fn._saved_dim)
    if sizes is None or dim not in (1, -1):  # TP maps splits at dim 1 or -1 only
        return
    total, step = int(sizes[dim]), int(fn._saved_split_size)
    chunks = [min(step, total - start) for start in range(0, total, step)]
    if not _readers_in_order(node, len(chunks)):
        return
    node.module.split_sizes = chunks
    node.module.offsets = [sum(chunks[:i]) for i in range(len(chunks) + 1)]


def _size_concat(node: Any) -> None:
    """A concatenation's piece sizes as the trace saw them, where TP's inputs are its pieces one
    to one, in order; and no index map where it joins along a dim of no channels. TP guesses
    the sizes from the layers around it and failed the whole trace where it could not
    ("unsupported operand type(s) for +: 'int' and 'NoneType'": DPN, whose dense path
    concatenates slices of convs' outputs)."""
    fn = node.grad_fn
    sizes = fn.metadata.get(_CAT_SIZES) if fn is not None else None
    if fn is not None and fn.metadata.get(_CAT_ACROSS):
        # Every piece keeps its channels where they are: TP, taking any negative dim for the
        # channels', mapped them by the positions' offsets, and a key cache's join cut k
        # apart from v and the model's positions with it (OPT: 4 of 8 keys, silently).
        node.enable_index_mapping = False
    edges = [f for f, _ in getattr(fn, "next_functions", ())]
    if sizes is not None and len(edges) == len(sizes):
        # An empty piece with no graph (a cache's start) is not among TP's inputs: it holds
        # no channels, so the pieces around it keep their offsets.
        kept = [(f, n) for f, n in zip(edges, sizes, strict=True) if f is not None or n]
        edges, sizes = [f for f, _ in kept], [n for _, n in kept]
    if sizes is None or len(edges) != len(sizes) or len(node.inputs) != len(edges):
        return  # a piece with no graph (a constant) or read twice: TP's offsets would not fit
    if [n.grad_fn for n in node.inputs] != edges:
        return
    node.module.concat_sizes = list(sizes)


def _readers_in_order(node: Any, pieces: int) -> bool:
    """Put a split node's readers in its pieces' order; False (left as they are) where they
    are not one reader per piece. TP maps its i-th reader to the i-th piece, and lists them as
    it meets them walking back from the outputs: attention written as its products meets v's
    before q's, and a split by sizes whose pieces are concatenated again (timm's MixedConv2d)
    had its first piece's channels cut from the last piece's producer."""
    read = [_chunk_read(out, node.grad_fn) for out in node.outputs]
    if sorted(read, key=lambda i: -1 if i is None else i) != list(range(pieces)):
        # A piece read twice (YOLO's C2f: one chunk into a bottleneck and a concat) or a
        # reader of two pieces breaks that (IndexError: the whole model failed to trace).
        # TP's own guess then stands, and the route check and the dry run judge the groups
        # through it.
        return False
    node.outputs[:] = [out for _, out in sorted(zip(read, node.outputs, strict=True))]
    return True


def _chunk_read(reader: Any, split_fn: Any) -> int | None:
    """Which output of ``split_fn`` the node ``reader`` reads (None: none, or several)."""
    read = {i for f, i in getattr(reader.grad_fn, "next_functions", ()) if f is split_fn}
    return read.pop() if len(read) == 1 else None


@contextlib.contextmanager
def channel_splits_mapped() -> Iterator[None]:
    """While a graph is built, map the splits Torch-Pruning's class-token rule turned off where
    they split tokens' channels (see the module); a split along the tokens stays unmapped."""
    graph = tp.DependencyGraph
    original = graph._trace

    def trace(self: tp.DependencyGraph, *args: Any, **kwargs: Any) -> Any:
        module2node = original(self, *args, **kwargs)
        for node in module2node.values():
            if node.type == tp.ops.OPTYPE.SPLIT and _along_channels(node.grad_fn):
                node.enable_index_mapping = True
        return module2node

    graph._trace = trace
    try:
        yield
    finally:
        graph._trace = original


def _along_channels(fn: Any) -> bool:
    """Whether a split's autograd node cut a tensor of up to 3 dims along its last: a Linear's
    channels (``Cut`` writes a channel split as -1)."""
    dim, sizes = getattr(fn, "_saved_dim", None), getattr(fn, "_saved_self_sym_sizes", None)
    if dim is None or sizes is None or len(sizes) > 3:
        return False
    return signed(dim) in (-1, len(sizes) - 1)


def signed(saved: int) -> int:
    """An int64 (a dim, a slice's start) as autograd saves it, which keeps a negative one
    unsigned (-1 as 2**64 - 1)."""
    saved = int(saved)
    return saved - 2**64 if saved >= 2**63 else saved


_bound_index_maps()
