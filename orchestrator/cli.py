"""The ``prunesearch`` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException

from . import _console as console
from ._config import load_config
from ._console import format_table, plural
from ._errors import one_line, root_error, settle_stopped_search, write_error
from ._limits import check_tracking_uri
from ._preflight import preflight as _preflight
from ._preflight import prepare_checked as _prepare
from ._preflight import resolve_config_task as _resolve_task
from ._readonly import bound_mlflow_http, check_model_uri, check_tracking_readable
from ._schema import ConfigError
from ._secrets import mask_text

if TYPE_CHECKING:  # _search imports Ray: a check or --help need not
    from search_space import DroppableBlock

    from ._search import Prepared


# Exit codes: 0 done, 1 partial (front models not registered; nightly: trials unlogged), 2 a bad
# input or a known failure, 130 a signal, UNEXPECTED an error we did not foresee. A scheduler alerting on "1" must not take a
# bug for a partial run, so it gets a code of its own.
UNEXPECTED = 3


def main(argv: Sequence[str] | None = None) -> int:
    # MLflow's per-download progress bars would interleave with our progress lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    console.setup(args.debug)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, OSError, MlflowException) as exc:
        if args.debug:
            raise
        written = (
            isinstance(exc, OSError) and exc.filename and not isinstance(exc, FileNotFoundError)
        )
        message = write_error(exc) if written else str(root_error(exc))
        print(f"prunesearch: error: {mask_text(one_line(message))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunesearch: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except SystemExit as exc:  # prunesearch's commands return; an exit comes from user code
        if args.debug:
            raise
        print(
            f"prunesearch: error: task: code of task {args_task(args)} called sys.exit({exc.code!r}) "
            "(a model, loader or evaluate function); a task must not exit: raise an exception",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:  # not a mistake we know: still one line; --debug shows where
        if args.debug:
            raise
        exc = root_error(exc)
        text = mask_text(one_line(str(exc)))[:400]
        print(
            f"prunesearch: error: {type(exc).__name__}: {text}; an unexpected error: "
            "--debug shows the traceback (please report it)",
            file=sys.stderr,
        )
        return UNEXPECTED


def args_task(args: argparse.Namespace) -> str:
    """The task a command's config names, for an error line (best effort)."""
    try:
        return repr(load_config(args.config, args.overrides).task)
    except Exception:
        return "(unknown)"


def build_parser() -> argparse.ArgumentParser:
    """The ``prunesearch`` command line: every subcommand and its options."""
    p = argparse.ArgumentParser(
        prog="prunesearch", description="Search pruning plans on a Ray cluster."
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    _search_commands(sub)
    _job_commands(sub)
    _model_commands(sub)
    return p


def _search_commands(sub: Any) -> None:
    """Commands on a search's config: run, check, sensitivity, pareto, nightly."""
    run = sub.add_parser("run", help="run (or resume) a search from a YAML config")
    _config_args(run)
    _local_storage_arg(run)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config and trace the model; start nothing")
    _config_args(check)
    check.add_argument("--json", action="store_true", help="print what was found as JSON")
    check.set_defaults(func=cmd_check)

    sens = sub.add_parser(
        "sensitivity",
        help="scan each layer's accuracy drop when pruned alone (cached per base model)",
    )
    _config_args(sens)
    sens.set_defaults(func=cmd_sensitivity)

    pareto = sub.add_parser("pareto", help="print a search's Pareto front")
    _config_args(pareto)
    pareto.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pareto.set_defaults(func=cmd_pareto)

    nightly = sub.add_parser(
        "nightly",
        help="tonight's run of a search: idempotent for a date, warm-started "
        "from the last night, moves the registry alias only when it wins",
    )
    _config_args(nightly)
    nightly.add_argument(
        "--date",
        type=dt.date.fromisoformat,
        default=None,
        help="the night, YYYY-MM-DD (default: today, UTC)",
    )
    _local_storage_arg(nightly)
    nightly.set_defaults(func=cmd_nightly)


def _job_commands(sub: Any) -> None:
    """Commands on the cluster's Ray jobs: submit, status, logs, stop."""
    submit = sub.add_parser(
        "submit", help="submit a search to a Ray cluster as a Ray job (the driver runs there)"
    )
    _config_args(submit)
    _address_arg(submit)
    submit.add_argument(
        "--wait", action="store_true", help="stream the job's logs and exit with its outcome"
    )
    submit.add_argument(
        "--nightly", action="store_true", help="run `prunesearch nightly` for today on the cluster"
    )
    submit.add_argument(
        "--id", dest="job_id", help="submission id (default: prunesearch-NAME-YYYYMMDD, one a day)"
    )
    submit.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATH",
        help="also upload this file or directory (repeatable); the config and the task's "
        "package always travel, nothing else does",
    )
    submit.add_argument(
        "--dry-run", action="store_true", help="list what would be uploaded; submit nothing"
    )
    _local_storage_arg(submit)
    submit.set_defaults(func=cmd_submit)
    for name, text in (
        ("status", "a submitted search's state"),
        ("logs", "a submitted search's driver log"),
        ("stop", "stop a submitted search (it drains; submit again to resume)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job_id", help="the submission id that submit printed")
        _address_arg(cmd)
        if name == "logs":
            cmd.add_argument(
                "--follow", action="store_true", help="keep streaming until the job ends"
            )
        cmd.set_defaults(func=cmd_job)


def _model_commands(sub: Any) -> None:
    """Commands on registered models: fetch, export, and the MLflow UI."""
    fetch = sub.add_parser(
        "fetch", help="load a registered pruned model (models:/NAME@ALIAS) and run it once"
    )
    fetch.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model")
    fetch.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    fetch.add_argument("--out", help="also keep the model's files in this directory")
    fetch.set_defaults(func=cmd_fetch)

    export = sub.add_parser(
        "export", help="write a registered model as ONNX or a torch.export (pt2) archive"
    )
    export.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID")
    export.add_argument("--format", choices=("onnx", "pt2"), default="onnx")
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    export.set_defaults(func=cmd_export)

    ui = sub.add_parser(
        "ui", help="open a search's front in the MLflow UI (serves a local store with mlflow ui)"
    )
    _config_args(ui)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--print", dest="print_only", action="store_true", help="print the URL only")
    ui.set_defaults(func=cmd_ui)


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="the Ray head's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)",
    )


def _local_storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-local-storage",
        action="store_true",
        help="accept SQLite/file stores on the node that runs the driver of a multi-node cluster",
    )


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. --set search.trials=8 (repeatable)",
    )


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    _preflight(config)
    prepared = _prepare(config)
    blocks, depth = _droppable(prepared)
    report = console.discovery_report(prepared.discovery, blocks, depth)
    if args.json:
        print(json.dumps({"config": config.name, **report}, indent=2))
        return 0
    print(
        f"config ok: {config.name}; {len(report['groups'])} prunable groups, "
        f"{len(report['excluded'])} left out"
    )
    print("\n".join(console.discovery_lines(report)))
    return 0


def _droppable(prepared: Prepared) -> tuple[tuple[DroppableBlock, ...], str]:
    """The model's residual blocks and a line saying whether a plan of this search may drop
    them whole (or why not): a user's own model shows here whether depth applies to it."""
    from search_space import residual_blocks

    space = prepared.space
    if space.granularity != "allocation":
        return (
            (),
            f"not dropped (depth needs search.space.granularity: allocation, not {space.granularity})",
        )
    task = prepared.task
    blocks = residual_blocks(task.model, task.example_inputs, prepared.discovery)
    if not blocks:
        return (), (
            "none found (a block is x + f(x): a module whose forward adds its own input "
            "back, or such an addition in any forward where f reads only x through child "
            "modules called nowhere else; `x = x + self.mlp(x)` is one)"
        )
    if space.depth == 0:
        return blocks, (
            f"{len(blocks)} found, none dropped (search.space.depth: 0: channels only; null, "
            "the default, or N lets a plan drop them whole)"
        )
    if space.depth is None:
        return blocks, (
            f"{len(blocks)}; a plan may drop them whole (search.space.depth: null, the "
            "default), the least damaging first"
        )
    return blocks, (
        f"{len(blocks)}; a plan may drop at most {space.depth} of them whole "
        f"(search.space.depth: {space.depth}), the least damaging first"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from ._cluster import check_artifacts, check_cluster_stores, ensure_ray
    from ._search import run_search

    config = load_config(args.config, args.overrides)  # every check happens before Ray starts
    _preflight(config)
    from ._resume import already_finished

    if done := already_finished(config):  # nothing to run: no Ray, no task build
        print(done)
        return 0
    prepared = _prepare(config)
    check_artifacts(config)
    ensure_ray(config.ray_address)
    check_cluster_stores(config, args.allow_local_storage)
    try:
        outcome = run_search(prepared, progress=_progress)
    except Exception as exc:
        reported = settle_stopped_search(config, exc)
        if reported is exc:
            raise
        raise reported from exc
    if outcome.stopped_by == "signal":
        print(
            f"\nstopped by a signal after {sum(outcome.counts.values())} trials; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    print()
    print(
        f"Pareto front of {config.name} ({plural(len(outcome.front), 'model')}; stopped by {outcome.stopped_by}; "
        f"hypervolume {outcome.hypervolume:.4f}):"
    )
    measured = any(r.status == "complete" for r in outcome.results)  # TrialStatus is a StrEnum
    print(format_table(outcome.front) if outcome.front or not measured else _no_gain(outcome.base))
    uri = mask_text(config.tracking.resolved_uri())
    print(
        f"\nMLflow ({uri}): parent run {outcome.parent_run_id} in experiment {config.experiment!r}."
    )
    print(
        f"Browse it:  prunesearch ui {args.config}   (the MLflow UI at the front's runs; the parent "
        "run holds front_report.html)"
    )
    if outcome.unregistered:
        print(_unregistered(outcome.unregistered), file=sys.stderr)
        return 1
    return 0


def _unregistered(failed: dict[int, str]) -> str:
    """Why the run exits 1 although its search finished: models of the front are missing from
    the registry (each warned of as it failed); a rerun registers them."""
    lines = "\n".join(f"  trial {trial}: {why}" for trial, why in sorted(failed.items()))
    return (
        f"prunesearch: error: {plural(len(failed), 'front model')} not registered (the search, "
        f"its runs and their weights are all in MLflow):\n{lines}\nrun the same command again "
        "to retry them: it measures nothing again"
    )


def _progress(line: str) -> None:
    """A search's progress goes to stderr, its results (the front table) to stdout: a script
    can pipe the table while a person watches the search."""
    print(line, file=sys.stderr, flush=True)


def _shapes(value: Any) -> str:
    """A tensor's shape, or the shapes of several (a model's inputs or outputs), for a line."""
    from workers import tensors

    shapes = [str(tuple(t.shape)) for t in tensors(value)]
    return shapes[0] if len(shapes) == 1 else "(" + ", ".join(shapes) + ")"


def _no_gain(base: dict[str, float]) -> str:
    """Why a search that measured trials has an empty front: the base model dominates them."""
    noise = float(base.get("calibration_noise", 0.0))
    floor = f", by more than the {100 * noise:.1f} % noise floor" if noise else ""
    return (
        f"(none: no feasible trial is faster than the base model ({base['latency_ms']:.3f} ms"
        f"{floor}) or more accurate ({base['accuracy']:.4f}), so the base model stays the best pick; on this "
        "target pruning did not shorten the time enough: widen search.space.ratio, or measure on "
        "the target you deploy to)"
    )


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from ._sensitivity import narrowed, sensitivity
    from ._study import open_study

    config = load_config(args.config, args.overrides)
    _preflight(config)
    prepared = _prepare(config)
    table = sensitivity(prepared, open_study(config))
    space, _ = narrowed(prepared, table)
    ratios = [f"{r:g}" for r in config.search.sensitivity.ratios]
    print(
        f"base accuracy {table.base_accuracy:.4f}; accuracy drop with each group pruned alone, no finetuning:"
    )
    print(
        f"{'group':40s} {'channels':>8s} "
        + " ".join(f"{'@' + r:>8s}" for r in ratios)
        + "  upper bound"
    )
    for g in prepared.discovery.groups:
        drops = [f"{table.base_accuracy - table.accuracy[g.name][r]:8.4f}" for r in ratios]
        bound = next((hi for unit, (lo, hi) in space.overrides.items() if unit == g.name), None)
        print(
            f"{g.name:40s} {g.channels:8d} "
            + " ".join(drops)
            + (f"  {bound:g}" if bound is not None else "")
        )
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from ._cluster import check_artifacts, check_cluster_stores, ensure_ray
    from ._nightly import run_nightly

    config = load_config(args.config, args.overrides)
    _preflight(config)
    _resolve_task(config)  # a task that does not import is refused before Ray starts
    check_artifacts(config)
    ensure_ray(config.ray_address)
    check_cluster_stores(config, args.allow_local_storage)
    return run_nightly(config, args.date or dt.datetime.now(dt.UTC).date(), _progress)


def cmd_submit(args: argparse.Namespace) -> int:
    from ._submit import submit

    config = load_config(args.config, args.overrides)  # checked here, before the cluster sees it
    return submit(
        config,
        Path(args.config),
        args.overrides,
        args.address if args.dry_run else _address(args),
        wait=args.wait,
        allow_local=args.allow_local_storage,
        job_id=args.job_id,
        nightly=args.nightly,
        includes=args.include,
        dry_run=args.dry_run,
    )


def cmd_job(args: argparse.Namespace) -> int:
    from . import _submit

    if args.command == "logs":
        return _submit.logs(_address(args), args.job_id, follow_=args.follow)
    return getattr(_submit, args.command)(_address(args), args.job_id)


def _address(args: argparse.Namespace) -> str:
    if not args.address:
        raise ValueError(
            "--address: which Ray cluster? pass --address http://HEAD:8265 or set RAY_ADDRESS"
        )
    return args.address


def cmd_pareto(args: argparse.Namespace) -> int:
    from ._tracking import front_from_mlflow

    config = load_config(args.config, args.overrides)
    bound_mlflow_http()
    check_tracking_uri(config.tracking.resolved_uri())
    check_tracking_readable(config.tracking.resolved_uri(), "tracking.uri")
    rows = front_from_mlflow(config)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from ._registry import fetch

    registered = check_model_uri(args.uri)
    bound_mlflow_http()
    tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if registered:  # a local model directory reads no tracking store
        check_tracking_uri(tracking, "--tracking-uri")
        check_tracking_readable(tracking, "--tracking-uri")
    loaded = fetch(args.uri, tracking_uri=tracking, out=args.out)
    params = sum(p.numel() for p in loaded.model.parameters())
    print(
        f"{args.uri}: {params / 1e3:.1f} k params; ran its input example {_shapes(loaded.example)} "
        f"-> output {_shapes(loaded.output)}"
    )
    for key, value in sorted(loaded.tags.items()):
        print(f"  {key}: {value}")
    if args.out:
        print(
            f"files in {args.out}; load them with mlflow.pytorch.load_model({args.out!r}) under "
            "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false (MLflow then checks nothing in them is unpickled)"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ._deploy import export_model

    if not check_model_uri(args.uri):
        raise ValueError("uri: export reads the registry: give models:/NAME@ALIAS or runs:/RUN_ID")
    bound_mlflow_http()
    tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    check_tracking_readable(tracking, "--tracking-uri")
    path = export_model(args.uri, args.format, args.out, tracking_uri=tracking)
    print(f"{args.uri}: wrote {args.format} to {path} ({path.stat().st_size / 1e3:.1f} kB)")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from ._ui import serve

    config = load_config(args.config, args.overrides)
    bound_mlflow_http()
    check_tracking_readable(config.tracking.resolved_uri(), "tracking.uri")
    return serve(config, args.host, args.port, print_only=args.print_only)


if __name__ == "__main__":
    sys.exit(main())
