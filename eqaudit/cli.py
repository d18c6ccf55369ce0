"""Command-line interface: parse options -> AuditConfig -> library -> report -> exit code.

No maths here. User errors (:class:`~eqaudit.errors.EqauditError`) print one line and exit with
their code; anything else is a bug and exits 4 with a traceback.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from eqaudit.errors import EXIT_INTERNAL, EqauditError, UsageError

app = typer.Typer(
    name="eqaudit",
    help="Audit image classifiers (PyTorch or ONNX) for invariance and per-layer equivariance "
    "under rotations, flips and shifts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _handle_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from eqaudit.reports import console

        try:
            return func(*args, **kwargs)
        except EqauditError as exc:
            console.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.error("interrupted: no report was written")
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception:
            traceback.print_exc()
            console.error(
                "internal error: this is a bug in eqaudit; please report it with the "
                "traceback above"
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(
            f"{name} '{text}' is not a comma-separated list of numbers, e.g. 0.485,0.456,0.406"
        ) from None


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
    str | None, typer.Option(help="ONNX: the class-score output, when the graph has several.")
]
LayoutOpt = Annotated[
    str | None, typer.Option(help="Input layout NCHW or NHWC (default: detected from the graph).")
]
InputSizeOpt = Annotated[
    str | None,
    typer.Option(help="Input size N or HxW; needed when the model's H and W are dynamic."),
]
ProvidersOpt = Annotated[
    str | None,
    typer.Option(
        help="ONNX Runtime execution providers, comma-separated (default CPUExecutionProvider)."
    ),
]


def _model_options(**kw: Any) -> dict[str, Any]:
    from eqaudit.config import parse_input_size

    return {
        "factory": kw["factory"],
        "trust_pickle": kw["trust_pickle"],
        "input_name": kw["input_name"],
        "output_name": kw["output_name"],
        "layout": kw["layout"],
        "providers": _csv(kw["providers"]),
        "input_size": parse_input_size(kw["input_size"]),
    }


@app.command()
@_handle_errors
def check(
    model: Annotated[
        Path,
        typer.Argument(
            help="Model file: .onnx, .pt2 (torch.export), TorchScript, or a state dict with --factory."
        ),
    ],
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
        typer.Option(help="Preprocessing preset: imagenet, caffe, inception, unit, raw255."),
    ] = None,
    resize: Annotated[
        str | None,
        typer.Option(
            help="Resize policy: crop (short side + centre crop), center (centre crop, no scaling), stretch, letterbox."
        ),
    ] = None,
    channels: Annotated[
        str | None, typer.Option(help="Channel order the model expects: rgb, bgr or gray.")
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
        int, typer.Option(help="Images per forward call, all transforms included.")
    ] = 64,
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
        typer.Option("--out", "-o", help="Output folder (default reports/<model-stem>/)."),
    ] = None,
    factory: FactoryOpt = None,
    trust_pickle: TrustPickleOpt = False,
    input_name: InputNameOpt = None,
    output_name: OutputNameOpt = None,
    layout: LayoutOpt = None,
    input_size: InputSizeOpt = None,
    providers: ProvidersOpt = None,
) -> None:
    """Audit MODEL: output invariance and per-layer equivariance; writes summary.json and CSVs."""
    from eqaudit.config import AuditConfig
    from eqaudit.transforms.labels import parse_label_action_options

    config = AuditConfig(
        transforms=transforms,
        shift_mode=shift_mode,
        data=data,
        labels=labels,
        num_images=num_images,
        seed=seed,
        preset=preset,
        resize=resize,
        channels=channels,
        scale=scale,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        outputs=outputs,
        layers=not no_layers,
        layer_patterns=_csv(layers),
        batch_size=batch_size,
        label_action=parse_label_action_options(label_action or []),
        **_model_options(
            factory=factory,
            trust_pickle=trust_pickle,
            input_name=input_name,
            output_name=output_name,
            layout=layout,
            input_size=input_size,
            providers=providers,
        ),
    )
    _run_check(model, config, out or Path("reports") / model.stem, suggest_label_action)


def _run_check(model: Path | str, config: Any, out: Path, suggest: bool = False) -> None:
    from eqaudit.audit import audit
    from eqaudit.reports import check_out_dir, console, write_report

    check_out_dir(out)  # a bad --out fails before the audit, not after it
    with console.progress_bar("auditing") as progress:
        result = audit(model, config=config, progress=progress)
    write_report(result, out)
    console.print_summary(result, out_dir=str(out))
    if suggest:
        console.print_label_suggestions(result)


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
    """List the transform families, one line each."""
    from eqaudit.reports import console
    from eqaudit.transforms import list_families

    console.print_families(list_families())


@app.command()
@_handle_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("reports/demo"),
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
        typer.Option("--out", "-o", help="HTML file to write (default: report.html beside it)."),
    ] = None,
) -> None:
    """Re-render report.html from a saved summary.json (and gallery.json); no model is run."""
    from eqaudit.reports import console
    from eqaudit.reports.html import rerender

    path = rerender(source, out)
    console.stdout.print(f"Report written to {path}", markup=False)


def main() -> None:
    """The console script: parse errors become one ``error:`` line too (exit 2)."""
    from eqaudit.reports import console

    try:
        code = app(prog_name="eqaudit", standalone_mode=False)
    except typer.Abort:
        console.error("interrupted: no report was written")
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
        console.error(f"{exc.format_message()} (see '{command} --help')")
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
