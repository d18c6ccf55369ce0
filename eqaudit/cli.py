"""Command-line interface: parse options -> AuditConfig -> library -> report -> exit code.

No maths here. User errors (:class:`~eqaudit.errors.EqauditError`) print one line and exit with
their code; anything else is a bug and exits 4 with a traceback.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from eqaudit.errors import EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_MODEL, EqauditError, UsageError

app = typer.Typer(
    name="eqaudit",
    help="Audit image classifiers (PyTorch or ONNX) for invariance and per-layer equivariance "
    "under rotations, flips and shifts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _print_version(value: bool) -> None:
    if value:
        from eqaudit import __version__

        typer.echo(f"eqaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print eqaudit's version and exit.",
            is_eager=True,
            callback=_print_version,
        ),
    ] = False,
) -> None:
    """Audit image classifiers (PyTorch or ONNX) for invariance and per-layer equivariance
    under rotations, flips and shifts."""


def _handle_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from eqaudit.reports import console

        previous = _catch_sigterm()
        try:
            return func(*args, **kwargs)
        except EqauditError as exc:
            console.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            name = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
            console.error(
                f"interrupted ({name}): no new report was written; a report already in the "
                "output folder is left as it was"
            )
            raise typer.Exit(143 if name == "SIGTERM" else 130) from None
        except typer.Exit:
            raise
        except MemoryError:
            console.error(
                "out of memory while auditing: lower --batch-size, audit fewer layers "
                "(--layers PATTERN or --no-layers), or use a smaller --input-size"
            )
            raise typer.Exit(EXIT_MODEL) from None
        except Exception:
            traceback.print_exc()
            console.error(
                "internal error: this is a bug in eqaudit; please report it with the "
                "traceback above"
            )
            raise typer.Exit(EXIT_INTERNAL) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the same clean-up runs as for Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _catch_sigterm() -> Any:
    """Handle SIGTERM like SIGINT while a command runs (main thread only); return the old
    handler, or None when it could not be installed."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):  # not the main thread (e.g. inside a test runner thread)
        return None


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip()) if text else ()


# Options shared by the commands that load a model.
FactoryOpt = Annotated[
    str | None,
    typer.Option(
        help="For a PyTorch state dict: the callable that builds the nn.Module, "
        "'path/to/file.py:build' or 'package.module:build'."
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow loading a fully pickled PyTorch model. Unpickling runs "
        "arbitrary code from the file: only for files you trust.",
    ),
]
InputNameOpt = Annotated[
    str | None, typer.Option(help="ONNX: the image input, when the graph has several.")
]
OutputNameOpt = Annotated[
    str | None,
    typer.Option(
        help="The class-score output, when the model has several: ONNX, an output name; "
        "PyTorch, an index of the returned tuple, a key of the returned dict, or a field or "
        "attribute name (a 'logits' entry is taken without it)."
    ),
]
LayoutOpt = Annotated[
    str | None,
    typer.Option(
        help="Input layout NCHW or NHWC (default: detected from an ONNX graph or a .pt2's input "
        "shape; NCHW for other PyTorch files)."
    ),
]
InputSizeOpt = Annotated[
    str | None,
    typer.Option(
        help="Input size N or HxW; needed when the model's H and W are dynamic. 'aligned' or "
        "'aligned:N' picks the nearest size (to the model's, or N) at which every strided "
        "layer's sampling grid is symmetric about the image centre."
    ),
]
ProvidersOpt = Annotated[
    str | None,
    typer.Option(
        help="ONNX Runtime execution providers, comma-separated (default CPUExecutionProvider)."
    ),
]


def _model_options(**kw: Any) -> dict[str, Any]:
    from eqaudit.config import split_input_size

    size, aligned = split_input_size(kw["input_size"])
    return {
        "factory": kw["factory"],
        "trust_pickle": kw["trust_pickle"],
        "input_name": kw["input_name"],
        "output_name": kw["output_name"],
        "layout": kw["layout"],
        "providers": _csv(kw["providers"]),
        "input_size": size,
        **({"align_input": True} if aligned else {}),
    }


# Gate options, shared by check and merge (merge judges the merged audit).
FailUnderOpt = Annotated[
    float | None,
    typer.Option(
        help="Fail (exit 1) when the robustness score (0-100) is below SCORE.",
        metavar="SCORE",
        rich_help_panel="Gate",
    ),
]
MinAgreementOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Minimum top-1 agreement: a value for every element, or ELEMENT=VALUE "
        "(globs allowed, e.g. 'rot*=0.9'); repeatable, the most specific pattern wins.",
        metavar="[ELEMENT=]VALUE",
        rich_help_panel="Gate",
    ),
]
MaxJsOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Maximum mean JS divergence, as --min-agreement: VALUE or ELEMENT=VALUE.",
        metavar="[ELEMENT=]VALUE",
        rich_help_panel="Gate",
    ),
]
MaxLayerErrorOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Maximum mean relative error of the layers matching a glob, under every "
        "element, e.g. 'layer3.*=0.05' (a bare VALUE: every layer); repeatable, the most "
        "specific pattern wins. With --channel-map, up to a fitted permutation of the channels.",
        metavar="[GLOB=]VALUE",
        rich_help_panel="Gate",
    ),
]
ConfidenceOpt = Annotated[
    float | None,
    typer.Option(
        help="Gate agreement on the lower bound of its Wilson interval at this level "
        "(e.g. 0.95) instead of the point estimate.",
        rich_help_panel="Gate",
    ),
]
SaveBaselineOpt = Annotated[
    Path | None,
    typer.Option(
        help="Write this run's numbers and fingerprint to FILE (JSON) for later --baseline.",
        metavar="FILE",
        rich_help_panel="Gate",
    ),
]
BaselineOpt = Annotated[
    Path | None,
    typer.Option(
        help="Compare with a baseline written by --save-baseline; refused (exit 2) when "
        "made with other transforms, preprocessing or images.",
        metavar="FILE",
        rich_help_panel="Gate",
    ),
]
MaxRegressionOpt = Annotated[
    float | None,
    typer.Option(
        help="With --baseline: how much worse agreement, JS divergence and orbit consistency "
        "may get (0-1 scale; the score may drop 100 X points). Default 0.",
        metavar="X",
        rich_help_panel="Gate",
    ),
]


@app.command()
@_handle_errors
def check(
    ctx: typer.Context,
    model: Annotated[
        Path | None,
        typer.Argument(
            help="Model file: .onnx, .pt2 (torch.export), TorchScript, or a state dict with --factory."
        ),
    ] = None,
    transforms: Annotated[
        str,
        typer.Option(
            "--transforms",
            "-t",
            help="Transform families, e.g. d4 | c4 | flips | rot:15,30 | shift:2,4; combine with commas.",
        ),
    ] = "d4",
    shift_mode: Annotated[
        str,
        typer.Option(
            help="How shifts fill the border: crop (from a larger source), circular, zero, reflect."
        ),
    ] = "crop",
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Folder of images (searched recursively) or a .npy/.npz array. Without it: synthetic images (with a warning).",
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            help="Class names file (.txt one per line, or .json); subfolder names of --data become labels."
        ),
    ] = None,
    num_images: Annotated[
        int | None,
        typer.Option("--num-images", "-n", help="Audit at most N images (a seeded sample)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for image sampling and synthetic images.")] = 0,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Preprocessing preset: imagenet, caffe, inception, unit, raw255 (default: "
            "unit, RGB pixels in 0-1 with no mean or std)."
        ),
    ] = None,
    resize: Annotated[
        str | None,
        typer.Option(
            help="Resize policy: crop (short side + centre crop; the default), center (centre "
            "crop, no scaling), stretch, letterbox."
        ),
    ] = None,
    channels: Annotated[
        str | None,
        typer.Option(
            help="Channel order the model expects: rgb, bgr or gray (default: rgb, or gray for a "
            "1-channel model)."
        ),
    ] = None,
    scale: Annotated[
        float | None, typer.Option(help="Pixel scale: 1 for 0-1 inputs, 255 for 0-255 inputs.")
    ] = None,
    mean: Annotated[
        str | None, typer.Option(help="Per-channel mean in scaled units, comma-separated.")
    ] = None,
    std: Annotated[
        str | None, typer.Option(help="Per-channel std in scaled units, comma-separated.")
    ] = None,
    outputs: Annotated[
        str, typer.Option(help="Model outputs: auto (detect), logits or probs.")
    ] = "auto",
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers", help="Audit only layers matching these glob patterns (comma-separated)."
        ),
    ] = None,
    no_layers: Annotated[
        bool, typer.Option("--no-layers", help="Skip per-layer equivariance (outputs only).")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Images per forward call, all transforms included (default 64 on the CPU; on "
            "a GPU, chosen from its free memory); at least one image's transforms together."
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="Where the model runs: cpu, cuda or cuda:N (PyTorch models; ONNX models need "
            "onnxruntime-gpu). Activations are reduced on the device.",
            rich_help_panel="Scale-out",
        ),
    ] = "cpu",
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads for the model and the comparisons (default: PyTorch's own setting "
            "for PyTorch models, one per physical core for ONNX models, both kept within a "
            "container's CPU limit; a PyTorch model on a GPU uses one). The numbers do not "
            "depend on it.",
            rich_help_panel="Scale-out",
        ),
    ] = None,
    misaligned: Annotated[
        str,
        typer.Option(
            help="Layers whose sampling grid an element does not map onto itself: flag (compare "
            "on the map's own grid, mark, keep out of layer scores), resample (approximate "
            "comparison about the true grid centre), skip (not measurable: no number).",
            rich_help_panel="Per-layer geometry",
        ),
    ] = "flag",
    padding_border: Annotated[
        str,
        typer.Option(
            help="Rotations by other angles: exclude (compare only the cells whose receptive "
            "field reads no padding: the padding does not turn with the image) or include "
            "(the whole central disk, padding effects counted as the model's).",
            rich_help_panel="Per-layer geometry",
        ),
    ] = "exclude",
    lie: Annotated[
        bool,
        typer.Option(
            "--lie",
            help="Lie derivatives of the outputs under rotation and translation (per radian, per "
            "pixel); PyTorch models also get each layer's contribution.",
            rich_help_panel="Per-layer geometry",
        ),
    ] = False,
    channel_map: Annotated[
        bool,
        typer.Option(
            "--channel-map",
            help="Also fit a 1x1 channel map per layer and element on half of the images and "
            "report the error on the other half (equivariance up to permuted channels, as in "
            "group-convolutional networks).",
            rich_help_panel="Per-layer geometry",
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Audit only the I-th of N slices of the images (1-based, e.g. 2/8 or "
            "$SLURM_ARRAY_TASK_ID/8) and save a mergeable state with the report; combine the "
            "shard folders with eqaudit merge.",
            metavar="I/N",
            rich_help_panel="Scale-out",
        ),
    ] = None,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="Run the audit as shards on a Ray cluster (pip install 'eqaudit\\[ray]') and "
            "merge them: the same result as a single run.",
            rich_help_panel="Scale-out",
        ),
    ] = False,
    shards: Annotated[
        int | None,
        typer.Option(
            help="With --ray: how many shards (default one per GPU with --device cuda, else "
            "one per CPU of the cluster).",
            rich_help_panel="Scale-out",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="With --ray: the cluster to join (default $RAY_ADDRESS, else a local one).",
            rich_help_panel="Scale-out",
        ),
    ] = None,
    label_action: Annotated[
        list[str] | None,
        typer.Option(
            "--label-action",
            help="How classes move under a D4 element, e.g. rot90=1,2,3,0 | "
            "rot90=cycle:up,left,down,right | flip_h=swap:left,right (repeatable); the audit "
            "then measures equivariance f(gx) = P_g f(x) instead of invariance.",
        ),
    ] = None,
    suggest_label_action: Annotated[
        bool,
        typer.Option(
            "--suggest-label-action",
            help="Print the class permutation each D4 element most often induces on the top-1 "
            "class (the action the model actually learned).",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output folder (default reports/<model-stem>/).", parser=_out_path
        ),
    ] = None,
    factory: FactoryOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_name: InputNameOpt = None,
    output_name: OutputNameOpt = None,
    layout: LayoutOpt = None,
    input_size: InputSizeOpt = None,
    providers: ProvidersOpt = None,
    fail_under: FailUnderOpt = None,
    min_agreement: MinAgreementOpt = None,
    max_js: MaxJsOpt = None,
    max_layer_error: MaxLayerErrorOpt = None,
    confidence: ConfidenceOpt = None,
    save_baseline: SaveBaselineOpt = None,
    baseline: BaselineOpt = None,
    max_regression: MaxRegressionOpt = None,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Config file: an eqaudit.toml, or a pyproject.toml with a tool.eqaudit table. "
            "Default: the nearest such file here or in a folder above.",
            metavar="FILE",
            rich_help_panel="Configuration",
        ),
    ] = None,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            help="Print the resolved configuration (command line > environment EQAUDIT_* > "
            "config file > defaults) and exit.",
            rich_help_panel="Configuration",
        ),
    ] = False,
) -> None:
    """Audit MODEL: output invariance and per-layer equivariance; writes report.html, summary.json and CSVs.

    With gate options, exits 1 when a check fails; the last line reads PASSED or FAILED.
    """
    from eqaudit.config import resolve_config
    from eqaudit.reports import console

    started = time.perf_counter()
    resolved = resolve_config(_given(ctx), config_file=config_file)
    for message in resolved.warnings:
        console.warn(message)
    if print_config:
        # TOML to paste or redirect: never wrapped at the terminal's width (COLUMNS=80 broke
        # its long comment lines into invalid TOML).
        console.stdout.print(
            resolved.to_toml(), markup=False, highlight=False, end="", soft_wrap=True
        )
        return
    if model is None:
        raise UsageError("missing MODEL: give the model file to audit, e.g. eqaudit check m.onnx")
    out_dir = Path(resolved.out) if resolved.out else Path("reports") / model.stem
    if (shards is not None or ray_address is not None) and not ray:
        raise UsageError("--shards and --ray-address go with --ray: add --ray")
    gate = resolved.gate
    if resolved.audit.shard is not None:
        from eqaudit.config import GATE_OPTIONS, GateConfig

        typed = GATE_OPTIONS & set(_given(ctx))
        if typed:
            raise UsageError(
                "gate options judge the whole audit: pass them to eqaudit merge, not to a "
                f"--shard run ({', '.join(sorted('--' + n.replace('_', '-') for n in typed))})"
            )
        gate = GateConfig()  # the config file's and environment's gates apply at the merge
    _run_check(
        model,
        resolved.audit,
        out_dir,
        suggest_label_action,
        gate=gate,
        started=started,
        ray={"shards": shards, "address": ray_address} if ray else None,
    )


def _out_path(raw: str | Path) -> Path:
    """``--out``, refusing an empty value: it means the current folder, whose report files a
    run replaces (an unset ``$OUT`` in a CI script, ``-o "$OUT"``). A default (``eqaudit demo``'s
    ``reports/demo``) comes through here too, already a Path."""
    if isinstance(raw, Path):
        return raw
    if not raw.strip():
        raise typer.BadParameter(
            "it is empty, which would mean the current folder: give a folder, e.g. -o reports/run1"
        )
    return Path(raw)


def _given(ctx: typer.Context) -> dict[str, Any]:
    """The options typed on the command line (not defaults): they override the environment and
    the config file."""
    given = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            given[name] = value
    return given


def _run_check(
    model: Path | str,
    config: Any,
    out: Path,
    suggest: bool = False,
    gate: Any = None,
    started: float | None = None,
    ray: dict | None = None,
) -> None:
    from eqaudit.audit import audit
    from eqaudit.config import GateConfig
    from eqaudit.gate import check_baseline_path, load_baseline
    from eqaudit.reports import KNOWN_FILES, check_out_dir, check_report_names, console
    from eqaudit.reports.markdown import render_audit

    started = time.perf_counter() if started is None else started
    gate = gate or GateConfig()
    if config.shard is not None and gate != GateConfig():
        raise UsageError(
            "gate options judge the whole audit: pass them to eqaudit merge, not to a --shard run"
        )
    check_out_dir(out)  # a bad --out fails before the audit, not after it
    shard_files = {"shard-state.json", "shard-state.npz"}
    check_report_names(out, KNOWN_FILES if config.shard else KNOWN_FILES - shard_files)
    baseline = load_baseline(gate.baseline) if gate.baseline else None  # likewise
    if gate.save_baseline:
        check_baseline_path(gate.save_baseline)
    with console.progress_bar("auditing" if ray is None else "auditing on Ray") as progress:
        if ray is None:
            result = audit(model, config=config, progress=progress)
        else:
            from eqaudit.distributed import audit_on_ray

            result = audit_on_ray(model, config, progress=progress, **ray)
    shard = result.summary.get("shard")
    if shard is not None and not shard["images"]:
        # More shards than images (a fixed Slurm array on a small set): nothing to report, but
        # the state, which merges as zero, so that eqaudit merge gets all N folders.
        from eqaudit.reports import write_report

        write_report(result, out)
        _report_in_place()
        console.warn(
            f"shard {shard['index']}/{shard['total']} has no images (the audit has fewer images "
            "than shards): only its state is written, which adds nothing to the merge"
        )
        _say_shard_written(config.shard, out)
        return
    result, verdict, lines = _judge_and_write(result, gate, baseline, out)
    console.print_summary(result, out_dir=str(out))
    if suggest:
        console.print_label_suggestions(result)
    if config.shard is not None:
        _say_shard_written(config.shard, out)
    _finish(
        lines,
        render_audit(result.summary),
        verdict.verdict(result.score, time.perf_counter() - started),
        verdict.passed,
    )


def _judge_and_write(result: Any, gate: Any, baseline: dict | None, out: Path) -> tuple:
    """Apply the gate to ``result``, write its report (the verdict included) into ``out``, then
    the baseline asked for (--save-baseline): ``check`` and ``merge`` alike. Returns the judged
    result, the verdict and the gate's lines to print."""
    from eqaudit.gate import evaluate_gate, save_baseline
    from eqaudit.reports import write_report

    verdict = evaluate_gate(result, gate, baseline)
    result = verdict.attach(result)
    write_report(result, out)
    _report_in_place()
    lines = verdict.lines()
    if gate.save_baseline:
        save_baseline(result, gate.save_baseline)
        lines.append(f"Baseline written to {gate.save_baseline}")
    return result, verdict, lines


def _say_shard_written(shard: tuple[int, int], out: Path) -> None:
    from eqaudit.reports import console

    index, total = shard
    console.stdout.print(
        f"Shard {index}/{total} state written to {out}: when all {total} shards are done, "
        "run eqaudit merge on their folders",
        markup=False,
        soft_wrap=True,
    )


#: Set by :func:`main`, the console script (not by a program or test that runs the app).
_SCRIPT = False


def _report_in_place() -> None:
    """The report is in place: from now on SIGINT and SIGTERM do nothing (console script only)
    and the few lines left to print finish. An interrupt here said that no new report was
    written, or died in the interpreter's exit with a traceback (review). A handler that does
    nothing, not SIG_IGN: an ignored signal stays ignored in the programs a process starts."""
    if _SCRIPT:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _ignored)


def _ignored(signum: int, frame: Any) -> None:
    """A signal that arrives once the report is written (see :func:`_report_in_place`)."""


def _finish(lines: list[Any], markdown: str, last: str, passed: bool) -> None:
    """Append the Markdown summary to $GITHUB_STEP_SUMMARY, print the gate lines (text, or a
    rich table) and the verdict as the last line, and exit 1 when the gate failed."""
    from eqaudit.reports import console
    from eqaudit.reports.markdown import append_step_summary

    problem = append_step_summary(markdown, os.environ.get("GITHUB_STEP_SUMMARY"))
    if problem:
        console.warn(problem)
    for line in lines:
        if isinstance(line, str):
            console.stdout.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            console.stdout.print(line)
    style = "bold green" if passed else "bold red"
    console.stdout.print(last, markup=False, highlight=False, soft_wrap=True, style=style)
    if not passed:
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
@_handle_errors
def inspect(
    model: Annotated[Path, typer.Argument(help="Model file to inspect.")],
    factory: FactoryOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_name: InputNameOpt = None,
    output_name: OutputNameOpt = None,
    layout: LayoutOpt = None,
    input_size: InputSizeOpt = None,
    providers: ProvidersOpt = None,
) -> None:
    """Print the input spec eqaudit detects, the outputs, and the auditable layers."""
    from eqaudit.inspect import inspect_model
    from eqaudit.reports import console

    options = _model_options(
        factory=factory,
        trust_pickle=trust_pickle,
        input_name=input_name,
        output_name=output_name,
        layout=layout,
        input_size=input_size,
        providers=providers,
    )
    console.print_inspection(inspect_model(model, **options))


@app.command("transforms")
@_handle_errors
def list_transforms() -> None:
    """List the transform families and their specs."""
    from eqaudit.reports import console
    from eqaudit.transforms import list_families

    console.print_families(list_families())


@app.command()
@_handle_errors
def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder.", parser=_out_path)
    ] = Path("reports/demo"),
    backend: Annotated[
        str, typer.Option(help="Which bundled copy to audit: onnx or torch.")
    ] = "onnx",
) -> None:
    """Audit the bundled demo classifier on its bundled images (writes reports/demo/)."""
    from eqaudit.demo.run import demo_config, demo_model

    _run_check(demo_model(backend), demo_config(backend), out)


@app.command()
@_handle_errors
def report(
    source: Annotated[
        Path,
        typer.Argument(help="A report folder written by eqaudit check, or its summary.json."),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="HTML file to write (default: report.html beside it).",
            parser=_out_path,
        ),
    ] = None,
) -> None:
    """Re-render report.html from a saved summary.json (and gallery.json); no model is run."""
    from eqaudit.reports import console
    from eqaudit.reports.html import rerender

    path = rerender(source, out)
    _report_in_place()
    console.stdout.print(f"Report written to {path}", markup=False, soft_wrap=True)


@app.command(
    short_help="Merge the states of N shards into the report a single run would give, then "
    "apply the gate."
)
@_handle_errors
def merge(
    ctx: typer.Context,
    shards: Annotated[
        list[Path],
        typer.Argument(help="The report folders written by eqaudit check --shard I/N, all N."),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output folder for the merged report.", parser=_out_path),
    ] = Path("reports/merged"),
    fail_under: FailUnderOpt = None,
    min_agreement: MinAgreementOpt = None,
    max_js: MaxJsOpt = None,
    max_layer_error: MaxLayerErrorOpt = None,
    confidence: ConfidenceOpt = None,
    save_baseline: SaveBaselineOpt = None,
    baseline: BaselineOpt = None,
    max_regression: MaxRegressionOpt = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="Config file whose gate thresholds apply.", metavar="FILE"),
    ] = None,
) -> None:
    """Merge the states of N shards into the report a single run would give (summary, CSVs,
    report.html), then apply the gate: the gate options of check, from the command line, the
    environment or the config file."""
    from eqaudit.config import GATE_OPTIONS, resolve_config
    from eqaudit.gate import check_baseline_path, load_baseline
    from eqaudit.reports import KNOWN_FILES, check_out_dir, check_report_names, console
    from eqaudit.reports.markdown import render_audit
    from eqaudit.shard import merge_shards

    started = time.perf_counter()
    given = {k: v for k, v in _given(ctx).items() if k in GATE_OPTIONS}
    resolved = resolve_config(given, config_file=config_file)
    gate = resolved.gate
    target = out.resolve()
    if any(Path(folder).resolve() == target for folder in shards):
        raise UsageError(
            f"-o {out} is one of the shard folders: merging there would replace its state; "
            "write the merged report to a folder of its own"
        )
    check_out_dir(out)
    check_report_names(out, KNOWN_FILES - {"shard-state.json", "shard-state.npz"})
    baseline = load_baseline(gate.baseline) if gate.baseline else None
    if gate.save_baseline:
        check_baseline_path(gate.save_baseline)
    result, verdict, lines = _judge_and_write(merge_shards(shards), gate, baseline, out)
    console.print_summary(result, out_dir=str(out))
    _finish(
        lines,
        render_audit(result.summary),
        verdict.verdict(result.score, time.perf_counter() - started),
        verdict.passed,
    )


# Audit options of `compare` (the same meaning as in `check`; both models get the same values).
_AUDIT = "Audit options (both models)"
TransformsOpt = Annotated[
    str,
    typer.Option(
        "--transforms", "-t", help="Transform families, as in check.", rich_help_panel=_AUDIT
    ),
]
ShiftModeOpt = Annotated[
    str, typer.Option(help="crop, circular, zero or reflect.", rich_help_panel=_AUDIT)
]
DataOpt = Annotated[
    str | None,
    typer.Option("--data", "-d", help="Image folder or .npy/.npz.", rich_help_panel=_AUDIT),
]
LabelsOpt = Annotated[str | None, typer.Option(help="Class names file.", rich_help_panel=_AUDIT)]
NumImagesOpt = Annotated[
    int | None,
    typer.Option("--num-images", "-n", help="At most N images (seeded).", rich_help_panel=_AUDIT),
]
SeedOpt = Annotated[int, typer.Option(help="Seed for image sampling.", rich_help_panel=_AUDIT)]
PresetOpt = Annotated[
    str | None,
    typer.Option(help="Preprocessing preset (default: unit, 0-1 RGB).", rich_help_panel=_AUDIT),
]
ResizeOpt = Annotated[
    str | None, typer.Option(help="Resize policy (default: crop).", rich_help_panel=_AUDIT)
]
ChannelsOpt = Annotated[
    str | None, typer.Option(help="rgb, bgr or gray (default: rgb).", rich_help_panel=_AUDIT)
]
ScaleOpt = Annotated[float | None, typer.Option(help="1 or 255.", rich_help_panel=_AUDIT)]
MeanOpt = Annotated[
    str | None, typer.Option(help="Per-channel mean, comma-separated.", rich_help_panel=_AUDIT)
]
StdOpt = Annotated[
    str | None, typer.Option(help="Per-channel std, comma-separated.", rich_help_panel=_AUDIT)
]
OutputsOpt = Annotated[str, typer.Option(help="auto, logits or probs.", rich_help_panel=_AUDIT)]
LayersOpt = Annotated[
    str | None,
    typer.Option("--layers", help="Layer glob patterns, comma-separated.", rich_help_panel=_AUDIT),
]
NoLayersOpt = Annotated[
    bool, typer.Option("--no-layers", help="Outputs only.", rich_help_panel=_AUDIT)
]
BatchSizeOpt = Annotated[
    int | None, typer.Option(help="Images per forward call.", rich_help_panel=_AUDIT)
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(help="CPU threads for the models and the comparisons.", rich_help_panel=_AUDIT),
]
LabelActionOpt = Annotated[
    list[str] | None,
    typer.Option("--label-action", help="ELEMENT=ACTION, as in check.", rich_help_panel=_AUDIT),
]


@app.command(
    short_help="Compare two models (or saved reports) on the same images, with paired "
    "statistics; gate on regressions."
)
@_handle_errors
def compare(
    ctx: typer.Context,
    a: Annotated[
        Path,
        typer.Argument(
            help="Model A (.onnx or PyTorch), or a saved report folder/summary.json.", metavar="A"
        ),
    ],
    b: Annotated[
        Path,
        typer.Argument(help="Model B, or a saved report folder/summary.json.", metavar="B"),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output folder (default reports/<A>-vs-<B>/).", parser=_out_path
        ),
    ] = None,
    alpha: Annotated[
        float,
        typer.Option(help="Significance level (family-wise over the elements, Holm)."),
    ] = 0.05,
    fail_on_regression: Annotated[
        bool,
        typer.Option(
            "--fail-on-regression",
            help="Exit 1 when B is significantly less invariant than A on any element.",
        ),
    ] = False,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="Config file for the audit options.", metavar="FILE"),
    ] = None,
    transforms: TransformsOpt = "d4",
    shift_mode: ShiftModeOpt = "crop",
    data: DataOpt = None,
    labels: LabelsOpt = None,
    num_images: NumImagesOpt = None,
    seed: SeedOpt = 0,
    preset: PresetOpt = None,
    resize: ResizeOpt = None,
    channels: ChannelsOpt = None,
    scale: ScaleOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    outputs: OutputsOpt = "auto",
    layers: LayersOpt = None,
    no_layers: NoLayersOpt = False,
    batch_size: BatchSizeOpt = None,
    threads: ThreadsOpt = None,
    label_action: LabelActionOpt = None,
    factory: FactoryOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_name: InputNameOpt = None,
    output_name: OutputNameOpt = None,
    layout: LayoutOpt = None,
    input_size: InputSizeOpt = None,
    providers: ProvidersOpt = None,
) -> None:
    """Compare A and B on the same images and elements: per-element agreement with an exact
    McNemar test and a bootstrap interval, JS divergence, per-layer errors, and how often A and
    B predict the same class. Writes compare.json, compare.csv, report.html, summary.md and junit.xml."""
    from eqaudit.compare import FILES, is_saved_report, refuse_out_in_sources, write_comparison
    from eqaudit.compare import compare as compare_models
    from eqaudit.config import resolve_config
    from eqaudit.reports import COMPARE_FOLDERS, check_out_dir, check_report_names, console
    from eqaudit.reports.markdown import render_compare

    started = time.perf_counter()
    out_dir = out or Path("reports") / f"{a.stem}-vs-{b.stem}"
    check_out_dir(out_dir)
    saved = is_saved_report(a) and is_saved_report(b)
    # (Saved audits are read, not written again: no a/ and b/ then.)
    check_report_names(out_dir, FILES, () if saved else COMPARE_FOLDERS)
    refuse_out_in_sources(out_dir, (a, b))  # before any audit runs
    if saved:
        extra = sorted(set(_given(ctx)) - {"a", "b", "out", "alpha", "fail_on_regression"})
        if extra:
            raise UsageError(
                f"{', '.join('--' + n.replace('_', '-') for n in extra)} do not apply when "
                "comparing saved audits: their numbers are already computed"
            )
        comparison, _, _ = compare_models(a, b, alpha=alpha, fail_on_regression=fail_on_regression)
    else:
        resolved = resolve_config(_given(ctx), config_file=config_file)
        for message in resolved.warnings:
            console.warn(message)
        with console.progress_bar("auditing A and B") as progress:
            comparison, result_a, result_b = compare_models(
                a,
                b,
                config=resolved.audit,
                alpha=alpha,
                fail_on_regression=fail_on_regression,
                progress=lambda label: progress,
            )
    write_comparison(comparison, out_dir, (a, b), audits=None if saved else (result_a, result_b))
    _report_in_place()
    _finish(
        [*comparison.lines(), f"Comparison written to {out_dir}"],
        render_compare(comparison.data),
        comparison.verdict(time.perf_counter() - started),
        comparison.passed,
    )


def _command_names() -> set[str]:
    return {c.name or c.callback.__name__ for c in app.registered_commands if c.callback}


def main() -> None:
    """The console script: parse errors become one ``error:`` line too (exit 2)."""
    global _SCRIPT
    _SCRIPT = True
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _main()
    finally:
        _SCRIPT = False
        if not _running_as_the_script():
            # A program (or test) that calls main() goes on, and must stay interruptible; the
            # script itself keeps ignoring the signals through the interpreter's exit.
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def _running_as_the_script() -> bool:
    """Is this process the ``eqaudit`` console script or ``python -m eqaudit``?"""
    program = sys.modules.get("__main__")
    spec = getattr(program, "__spec__", None)
    if spec is not None and spec.name == "eqaudit.__main__":
        return True
    return os.path.basename(getattr(program, "__file__", "") or "") in ("eqaudit", "eqaudit.exe")


def _main() -> None:
    from eqaudit.reports import console

    try:
        code = app(prog_name="eqaudit", standalone_mode=False)
    except typer.Abort:
        console.error("interrupted (SIGINT): no new report was written")
        sys.exit(130)
    except Exception as exc:
        # typer's bundled click raises its UsageError family for bad command lines.
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            console.stdout.print(ctx.get_help(), markup=False, highlight=False)
            sys.exit(0)
        command = ctx.command_path if ctx is not None else "eqaudit"
        named = sys.argv[1] if len(sys.argv) > 1 else ""
        if command == "eqaudit" and named in _command_names():
            command = f"eqaudit {named}"  # (an option's missing value leaves no subcommand ctx)
        console.error(f"{exc.format_message()} (see '{command} --help')")
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
