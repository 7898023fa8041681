"""Tasks whose models are shaped unlike the built-in ones, named ``module:function`` like a
user's own task: two inputs (an image and a vector of features) with a dict of two outputs,
the same model taking keyword inputs, and a model with a layer that insists on the state
dict's versions when it loads (as torchvision's MNASNet does), and a recurrent model and a
GPT-2 (its own ``Conv1D`` layers) that read an image row by row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from search_space import call_model
from workers import Task, build_task

from ..nets import StoredViT, TinyGPT


class TwoHeads(nn.Module):
    """An image through convolutions and a feature vector through a Linear layer, concatenated,
    into two heads: the digit and its remainder mod 4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.features = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.digit = nn.Linear(48, 10)
        self.remainder = nn.Linear(48, 4)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.cat([self.conv(image), self.features(features)], 1)
        return {"digit": self.digit(h), "remainder": self.remainder(h)}


class KeywordHeads(TwoHeads):
    """TwoHeads called with keyword inputs: ``model(image=..., features=...)``."""


class _Pairs(Dataset):
    """((image, features), digit), the features a noisy one-hot of the digit mod 4."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, keywords: bool) -> None:
        g = torch.Generator().manual_seed(0)
        self.images, self.labels, self.keywords = images, labels, keywords
        self.features = F.one_hot(labels % 4, 4).float() + 0.5 * torch.randn(
            len(labels), 4, generator=g
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        image, features = self.images[i], self.features[i]
        x = {"image": image, "features": features} if self.keywords else (image, features)
        return x, self.labels[i]


def heads_loss(out: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out["digit"], y) + 0.5 * F.cross_entropy(out["remainder"], y % 4)


@torch.no_grad()
def digit_accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    right = total = 0
    for x, y in loader:
        out = call_model(model, x)
        right += int((out["digit"].argmax(1) == y).sum())
        total += len(y)
    return right / total


def two_heads(options: dict[str, Any]) -> Task:
    return _heads(TwoHeads(), keywords=False)


def keyword_heads(options: dict[str, Any]) -> Task:
    return _heads(KeywordHeads(), keywords=True)


def _heads(model: TwoHeads, keywords: bool) -> Task:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(digits.target)
    train, val = (
        _Pairs(images[:1400], labels[:1400], keywords),
        _Pairs(images[1400:], labels[1400:], keywords),
    )
    loader = DataLoader(
        train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # a few epochs: well above chance, so pruning has something to keep
        for x, y in loader:
            out = call_model(model, x)
            opt.zero_grad()
            heads_loss(out, y).backward()
            opt.step()
    x, _ = train[0]
    example = (
        {k: v.unsqueeze(0) for k, v in x.items()} if keywords else tuple(v.unsqueeze(0) for v in x)
    )
    return Task(
        model=model.eval(),
        example_inputs=example,
        train_loader=loader,
        val_loader=DataLoader(val, batch_size=128),
        evaluate=digit_accuracy,
        loss_fn=heads_loss,
    )


class Versioned(nn.Module):
    """Wraps a model; loading a state dict without its version fails, as MNASNet's does."""

    _version = 2

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        if local_metadata.get("version") != 2:
            raise ValueError(
                f"version should be set to 2 instead of {local_metadata.get('version')}"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def versioned_digits(options: dict[str, Any]) -> Task:
    task = build_task("digits", options)
    task.model = Versioned(task.model)
    return task


class OneAtATime(nn.Module):
    """A model that takes one sample at a time (as some hand-written ones do)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise ValueError(f"this model takes one sample at a time, not {x.shape[0]}")
        return self.inner(x)


def one_at_a_time(options: dict[str, Any]) -> Task:
    task = build_task("digits", options)
    task.model = OneAtATime(task.model)
    return task


class DigitRows(nn.Module):
    """The 8x8 digit read row by row (a sequence of 8 steps of 8 pixels) by a two-layer
    recurrent layer; the class from its last layer's final state, through a hidden Linear.
    With ``conv``, a weight-normed Conv1d over each row's pixels comes first (as audio models
    put one before their recurrent layers)."""

    def __init__(
        self, cell: type[nn.RNNBase] = nn.LSTM, conv: bool = False, hidden: int = 32
    ) -> None:
        super().__init__()
        self.conv = (
            nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 16, 3, padding=1)) if conv else None
        )
        self.rnn = cell(16 if conv else 8, hidden, num_layers=2, batch_first=True)
        self.hidden = nn.Linear(hidden, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:  # channels are the pixels of a row; steps are rows
            rows = torch.relu(self.conv(rows.transpose(1, 2))).transpose(1, 2)
        _, states = self.rnn(rows)
        h = states[0] if isinstance(states, tuple) else states  # an LSTM's (h, c)
        return self.head(torch.relu(self.hidden(h[-1])))


def digit_rows(options: dict[str, Any]) -> Task:
    cell = {"lstm": nn.LSTM, "gru": nn.GRU}[options.get("cell", "lstm")]
    torch.manual_seed(0)
    model = DigitRows(
        cell, conv=bool(options.get("conv", False)), hidden=int(options.get("hidden", 32))
    )
    return _rows_task(model, lr=1e-2)


def digit_gpt(options: dict[str, Any]) -> Task:
    """The digit's rows as tokens through GPT-2's blocks, written with its ``Conv1D``."""
    torch.manual_seed(0)
    return _rows_task(TinyGPT(), lr=3e-3)


def digit_vit(options: dict[str, Any]) -> Task:
    """The digit's rows as tokens through timm-style attention that reshapes by stored sizes."""
    torch.manual_seed(0)
    return _rows_task(StoredViT(classes=10), lr=3e-3)


def _rows_task(model: nn.Module, lr: float) -> Task:
    """``model`` trained on the 8x8 digits read as 8 rows of 8 pixels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = torch.tensor(digits.images, dtype=torch.float32) / 16
    labels = torch.tensor(digits.target)
    train = list(zip(rows[:1400], labels[:1400], strict=True))
    loader = DataLoader(
        train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(8):  # well above chance, so pruning has something to keep
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    val = list(zip(rows[1400:], labels[1400:], strict=True))
    return Task(
        model=model.eval(),
        example_inputs=rows[:1],
        train_loader=loader,
        val_loader=DataLoader(val, batch_size=128),
    )


def double_digits(options: dict[str, Any]) -> Task:
    """The digits task in float64 throughout, weights and inputs, as scientific models run."""
    task = build_task("digits", options)

    def doubled(loader: DataLoader, shuffle: bool) -> DataLoader:
        x, y = loader.dataset.tensors
        data = torch.utils.data.TensorDataset(x.double(), y)
        return DataLoader(data, batch_size=loader.batch_size, shuffle=shuffle)

    return Task(
        model=task.model.double(),
        example_inputs=task.example_inputs.double(),
        train_loader=doubled(task.train_loader, True),
        val_loader=doubled(task.val_loader, False),
    )


def masked_digits(options: dict[str, Any]) -> Task:
    """The digits task whose convs were pruned unstructured before, with torch.nn.utils.prune
    (weight_orig and a mask, recombined by a forward pre-hook)."""
    task = build_task("digits", options)
    for module in task.model.modules():
        if isinstance(module, nn.Conv2d):
            torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.3)
    return task


class OneHeadInTheLoss(nn.Module):
    """Two heads behind their own convs, for a loss that reads only the first (``first_head``):
    the second conv and head get no gradient."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head_a, self.head_b = nn.Linear(8, 4), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.stem(x))
        a, b = torch.relu(self.a(x)).mean((2, 3)), torch.relu(self.b(x)).mean((2, 3))
        return self.head_a(a), self.head_b(b)


def first_head(out: tuple[torch.Tensor, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out[0], y)


@dataclass
class Scores:
    """A model library's output record: a dataclass, not a dict or a tuple."""

    logits: torch.Tensor
    features: torch.Tensor


class Recorded(nn.Module):
    """The digits model's features and logits, returned as a :class:`Scores` record."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> Scores:
        return Scores(logits=self.inner(x), features=self.features(x.flatten(1)))


def record_loss(out: Scores, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits, y)


def recorded_digits(options: dict[str, Any]) -> Task:
    task = build_task("digits", options)
    task.model, task.loss_fn = Recorded(task.model), record_loss
    task.evaluate = lambda model, loader: _record_accuracy(model, loader)
    return task


@torch.no_grad()
def _record_accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    pairs = [(model(x).logits.argmax(1) == y).float() for x, y in loader]
    return float(torch.cat(pairs).mean())


class VmapMasked(nn.Module):
    """The digits model, its logits scaled by a mask built as Hugging Face's mask code builds
    one: a function of indices, vmapped, indexing a tensor inside ``TransformGetItemToIndex``
    (the mask is all ones here, so the model computes what the digits model does). A
    non-strict ``torch.export`` of it (MLflow's) traces a ``flat_apply`` node it cannot save."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

        keep = x.flatten(1) > -1e9

        def allowed(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
            return keep[row, col]

        rows, cols = torch.arange(x.shape[0]), torch.arange(4)
        with TransformGetItemToIndex():
            mask = torch.vmap(torch.vmap(allowed, in_dims=(None, 0)), in_dims=(0, None))(rows, cols)
        return self.inner(x) * mask.float().mean(1, keepdim=True)


def vmap_masked_digits(options: dict[str, Any]) -> Task:
    task = build_task("digits", options)
    task.model = VmapMasked(task.model)
    return task


def compiled_digits(options: dict[str, Any]) -> Task:
    task = build_task("digits", options)
    task.model = torch.compile(task.model)
    return task


def parallel_digits(options: dict[str, Any]) -> Task:
    task = build_task("digits", options)
    task.model = nn.DataParallel(task.model)
    return task


def scripted_digits(options: dict[str, Any]) -> Task:
    task = build_task("digits", options)
    task.model = torch.jit.script(task.model)
    return task
