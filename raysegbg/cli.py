"""`raysegbg` command line: train, eval, predict, export, data.

Every handler validates its input before Ray starts; a `RaysegbgError` is printed as one line
(`error: ...`) with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from raysegbg.errors import RaysegbgError

if TYPE_CHECKING:
    from raysegbg.config import Config


def _train(args: argparse.Namespace) -> int:
    from raysegbg.ray_train import fit, print_summary

    result = fit(train_config(args), address=args.address)
    print_summary(result)
    return 0


def train_config(args: argparse.Namespace) -> Config:
    """The run config of `raysegbg train`: --config (or --from-run's config without its name),
    --set, then --workers, --gpu and --name."""
    from raysegbg.config import check_name, load_config, replace
    from raysegbg.runs import check_fresh, config_from_run

    if args.name is not None:
        check_name("--name", args.name)
    if args.workers is not None and args.workers < 1:
        raise RaysegbgError(f"--workers {args.workers} is out of range: use an integer >= 1")
    if args.config and args.from_run:
        raise RaysegbgError(
            "pass --config or --from-run, not both (--from-run DIR reads DIR/config.yaml; "
            "change its settings with --set)"
        )
    if args.from_run:
        cfg = config_from_run(args.from_run, args.set, args.name)
    else:
        cfg = load_config(args.config, args.set)
    scaling = {}
    if args.workers is not None:
        scaling["workers"] = args.workers
    if args.gpu:
        scaling["use_gpu"] = True
    if args.name is not None:
        cfg = replace(cfg, logging={"name": args.name})
    cfg = replace(cfg, scaling=scaling) if scaling else cfg
    if args.from_run:
        check_fresh(cfg, args.from_run)
    return cfg


def _eval(args: argparse.Namespace) -> int:
    from raysegbg.inference import evaluate
    from raysegbg.storage import location

    if args.json and not Path(args.json).parent.is_dir():
        raise RaysegbgError(
            f"--json {args.json}: folder {Path(args.json).parent} does not exist: create it "
            "or write the file elsewhere"
        )
    result = evaluate(location(args.run), args.split, args.checkpoint, args.set)
    print("\n".join(result.lines(f"{args.split} split, {args.checkpoint} checkpoint")))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from raysegbg.inference import predict_folder
    from raysegbg.storage import location

    out = Path(args.output)
    flags = {"probs": args.probs, "overlay": args.overlay, "tta": args.tta}
    count = predict_folder(
        location(args.run), Path(args.input), out, args.overwrite, **flags, overrides=args.set
    )
    extra = [f"{out / kind}/" for kind in ("probs", "overlay") if flags[kind]]
    also = f" (and {', '.join(extra)})" if extra else ""
    print(f"wrote {count} masks to {out}{also}{', flip TTA' if args.tta else ''}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from raysegbg.export import export_run
    from raysegbg.storage import location

    out = Path(args.out)
    sidecar = export_run(location(args.run), args.format, out, args.checkpoint, args.overwrite)
    print(f"wrote {out} ({args.format}) and {sidecar} (classes, channels, normalisation)")
    return 0


def _add_inference_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change an inference.* key for this command (sliding windows), e.g. --set "
        "inference.overlap=0.5 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysegbg", description="Background-aware segmentation training on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run on Ray Train (local or a cluster)")
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument(
        "--from-run",
        metavar="DIR",
        help="start a fresh run from a saved run's config.yaml (a new name is generated "
        "unless --name is given)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=5 (repeatable)",
    )
    p.add_argument("--workers", type=int, help="number of Ray Train workers (DDP ranks)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, AMP on")
    p.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    p.add_argument(
        "--name", help="run name; re-using a name resumes that run (with --from-run: a new one)"
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a run's best checkpoint on a split")
    p.add_argument(
        "--run", required=True, help="run folder or URI (<storage_path>/<name>, e.g. s3://...)"
    )
    p.add_argument("--split", default="test")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument(
        "--json", help="also write the metrics, per-class metrics and confusion matrix here"
    )
    _add_inference_set(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="write PNG masks for a folder of images")
    p.add_argument("--run", required=True, help="run folder or URI (<storage_path>/<name>)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True, help="mask folder, outside --input")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already there")
    p.add_argument(
        "--probs", action="store_true", help="also write probs/<image>.npy: float16 (C, H, W)"
    )
    p.add_argument(
        "--overlay", action="store_true", help="also write overlay/<image>.png: mask over image"
    )
    p.add_argument(
        "--tta", action="store_true", help="average with the prediction of the mirrored image"
    )
    _add_inference_set(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="write a run's model as ONNX, TorchScript or a state dict")
    p.add_argument("--run", required=True, help="run folder or URI (<storage_path>/<name>)")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "state_dict"))
    p.add_argument("--out", required=True, help="model file; its sidecar is <out>.json")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--overwrite", action="store_true", help="replace --out and its sidecar")
    p.set_defaults(func=_export)

    from raysegbg.data.commands import add_data_commands

    add_data_commands(sub)
    from raysegbg.job_commands import add_job_commands

    add_job_commands(sub)
    from raysegbg.tune_commands import add_tune_commands

    add_tune_commands(sub)
    from raysegbg.config_reference import add_config_commands

    add_config_commands(sub)
    from raysegbg.state.commands import add_state_commands

    add_state_commands(sub)
    from raysegbg.compare import add_compare_command

    add_compare_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from raysegbg import failures

    failures.EXIT_IF_LOCAL_HEAD_DIES = True  # a command's own Ray dies: one line, at once
    try:
        return args.func(args)
    except RaysegbgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = " (the same command again resumes it)" if args.func is _train else ""
        print(f"interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
