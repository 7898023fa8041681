"""A registered version's model card: what it is, how good and fast, where it came from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._config import Config


def model_card(
    config: Config,
    row: Mapping[str, Any],
    base: Mapping[str, float],
    run: Any,
    onnx: Mapping[str, Any] | None,
) -> str:
    """Markdown for the version's description in MLflow's model registry (a few lines)."""
    p = run.data.params
    recovery = ", ".join(
        f"{k.removeprefix('recovery.')} {v}"
        for k, v in sorted(p.items())
        if k.startswith("recovery.")
    )
    recipe = (
        f"criterion {p.get('ranked_by', p.get('criterion', row.get('criterion')))}, round_to {p.get('round_to', '-')}, "
        f"channel ratio mean {p.get('mean_ratio', '-')} / max {p.get('max_ratio', '-')} over "
        f"{p.get('units', '-')} units"
        + (
            f", {dropped} residual blocks dropped"
            if (dropped := p.get("blocks_dropped", "0")) != "0"
            else ""
        )
        + (f"; recovery: {recovery}" if recovery else "")
    )
    lines = [
        f"**{config.task}** pruned by prunesearch: trial {row['trial']} of search "
        f"`{config.name}` (run `{run.info.run_id}`, parent run "
        f"`{run.data.tags.get('mlflow.parentRunId', '-')}`).",
        "",
        f"- accuracy {row['accuracy']:.4f} (base {base['accuracy']:.4f})",
        f"- latency {row['latency_ms']:.3f} ms on target `{config.target.name}` "
        f"(base {base['latency_ms']:.3f} ms): {row['speedup']:.2f}x speed-up",
        f"- {_mega(row.get('macs'))} MACs (base {_mega(base.get('macs'))}), "
        f"{_kilo(row.get('params'))} params (base {_kilo(base.get('params'))})",
        f"- recipe: {recipe}",
    ]
    if onnx and "skipped" in onnx:
        lines.append(f"- ONNX: not exported ({onnx['skipped']})")
    elif onnx:
        lines.append(
            f"- ONNX: `onnx/model.onnx` on the run, opset {onnx['opset']} (torch's "
            f"{onnx.get('exporter', 'torchscript')} exporter), max |ONNX Runtime - PyTorch| "
            f"{onnx['max_abs_diff']:.2g} on the input example"
        )
    lines.append(
        "- load as an `nn.Module`: `orchestrator.load_module(uri, build_task(task).model)`; "
        "`mlflow.pytorch.load_model(uri)` gives a torch.export program"
    )
    return "\n".join(lines)


def _mega(value: Any) -> str:
    return "-" if value is None else f"{float(value) / 1e6:.2f} M"


def _kilo(value: Any) -> str:
    return "-" if value is None else f"{float(value) / 1e3:.1f} k"
