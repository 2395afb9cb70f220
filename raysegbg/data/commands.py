"""`raysegbg data make|import|info`: build datasets and describe them.

Handlers return an exit code and let `RaysegbgError` propagate; the main CLI prints it as one
line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from raysegbg import storage
from raysegbg.data.format import SPLITS, DatasetMeta, class_frequencies, read_meta
from raysegbg.errors import RaysegbgError


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` command with its `make`, `import` and `info` sub-commands."""
    data = subparsers.add_parser("data", help="create, import and inspect datasets")
    sub = data.add_subparsers(dest="data_command", required=True)
    _add_make(sub)
    _add_import(sub)
    p = sub.add_parser("info", help="print splits, sizes, class frequencies and provenance")
    p.add_argument("path", type=storage.location, help="dataset directory or object-store URI")
    p.set_defaults(func=cmd_info)


def _common(p: argparse.ArgumentParser, splits: bool = True) -> None:
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--labeled-fraction",
        type=float,
        default=1.0,
        help="share of train samples that keep their mask (the rest: image labels)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    if splits:
        p.add_argument("--val", type=float, default=0.1, help="fraction of samples for val")
        p.add_argument("--test", type=float, default=0.1, help="fraction of samples for test")


# after `_common`: None tells the importer "not given", so 0.1, or an error with --split-file
_FRACTIONS_UNSET = {"val": None, "test": None}


def _add_make(sub: argparse._SubParsersAction) -> None:
    from raysegbg.data.synthetic import GENERATORS

    p = sub.add_parser("make", help="generate a seeded synthetic dataset")
    p.add_argument("name", choices=sorted(GENERATORS), help="built-in generator")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    _common(p)
    p.set_defaults(func=cmd_make)


def _add_import(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser("import", help="import a folder, Pascal VOC or NIfTI volumes")
    kinds = imp.add_subparsers(dest="import_kind", required=True)
    p = kinds.add_parser("folder", help="image/mask pairs matched by file stem")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True)
    p.add_argument("--classes", nargs="+", required=True, help="class names, background first")
    p.add_argument("--channels", type=int, choices=(1, 3), help="default: 3 if any is colour")
    p.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--allow-unlabeled", action="store_true", help="images without a mask")
    p.add_argument("--name", help="dataset name (default: the images folder's parent)")
    _add_folder_rules(p)
    _common(p)
    p.set_defaults(func=cmd_import_folder, **_FRACTIONS_UNSET)

    p = kinds.add_parser("voc", help="Pascal VOC layout (JPEGImages, SegmentationClass)")
    p.add_argument("root", type=Path, help="folder holding JPEGImages/, e.g. VOCdevkit/VOC2012")
    p.add_argument(
        "--test-from-val",
        type=float,
        default=0.5,
        help="share of val that becomes test when there is no test.txt",
    )
    p.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--name", default="voc")
    _common(p, splits=False)
    p.set_defaults(func=cmd_import_voc)
    _add_nifti(kinds)


def _add_folder_rules(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--label-map",
        metavar="RAW:ID,...",
        help="mask value -> class id, e.g. 0:0,255:1 (id 255 = ignore); other values are errors",
    )
    p.add_argument(
        "--ignore-value", type=int, metavar="V", help="mask value meaning 'ignore' (default 255)"
    )
    _add_split_file(p, "image file stems")


def _add_split_file(p: argparse.ArgumentParser, ids: str) -> None:
    p.add_argument(
        "--split-file",
        type=Path,
        metavar="F",
        help=f'JSON {{"train": [ids], "val": [ids], "test": [ids]}} of {ids}; replaces '
        f"--val/--test",
    )


def _add_nifti(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("nifti", help="2-D slices of NIfTI image/label volume pairs")
    p.add_argument("--image", type=Path, action="append", required=True, help="repeatable")
    p.add_argument("--label", type=Path, action="append", required=True, help="one per --image")
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="slice axis")
    p.add_argument("--binarize", action="store_true", help="label > 0 -> class 1")
    p.add_argument("--label-map", default="auto", help="'auto' or RAW:ID,RAW:ID,...")
    p.add_argument("--label-names", type=Path, help="text file of '<value> <name>' lines")
    p.add_argument("--ignore-value", type=int, metavar="V", help="label value meaning 'ignore'")
    _add_split_file(p, "volume ids (file stems); each volume goes whole to one split")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="fit slices into HxW")
    p.add_argument("--slab", type=int, default=16, help="consecutive slices per split unit")
    p.add_argument("--gap", type=int, default=2, help="slices dropped between splits")
    p.add_argument("--min-foreground", type=float, default=0.0, help="skip emptier slices")
    p.add_argument(
        "--resample-labels",
        action="store_true",
        help="resample labels onto the image grid (nearest) when shapes differ",
    )
    p.add_argument("--name", default="nifti")
    _common(p)
    p.set_defaults(func=cmd_import_nifti, **_FRACTIONS_UNSET)


def _size(value: list[int] | None) -> tuple[int, int] | None:
    return (value[0], value[1]) if value else None


def _done(meta: DatasetMeta, out: Path) -> int:
    counts = ", ".join(f"{s}={meta.splits[s]}" for s in SPLITS)
    print(f"wrote {meta.name!r} to {out} ({counts}); see `raysegbg data info {out}`")
    return 0


def cmd_make(args: argparse.Namespace) -> int:
    from raysegbg.data.synthetic import make_dataset

    meta = make_dataset(
        args.name,
        args.out,
        n=args.n,
        size=args.size,
        seed=args.seed,
        labeled_fraction=args.labeled_fraction,
        val=args.val,
        test=args.test,
        overwrite=args.overwrite,
    )
    return _done(meta, args.out)


def cmd_import_folder(args: argparse.Namespace) -> int:
    from raysegbg.data.importers import import_folder
    from raysegbg.data.rules import mapping_note, parse_pairs

    meta = import_folder(
        args.images,
        args.masks,
        args.out,
        classes=args.classes,
        val=args.val,
        test=args.test,
        seed=args.seed,
        labeled_fraction=args.labeled_fraction,
        resize=_size(args.resize),
        channels=args.channels,
        allow_unlabeled=args.allow_unlabeled,
        name=args.name,
        overwrite=args.overwrite,
        label_map=parse_pairs(args.label_map) if args.label_map is not None else None,
        ignore_value=args.ignore_value,
        split_file=args.split_file,
    )
    note = mapping_note(meta.provenance, meta.classes)
    if note:
        print(note)
    return _done(meta, args.out)


def cmd_import_voc(args: argparse.Namespace) -> int:
    from raysegbg.data.importers import import_voc

    meta = import_voc(
        args.root,
        args.out,
        test_from_val=args.test_from_val,
        seed=args.seed,
        labeled_fraction=args.labeled_fraction,
        resize=_size(args.resize),
        name=args.name,
        overwrite=args.overwrite,
    )
    return _done(meta, args.out)


def parse_label_map(text: str) -> dict[int, int] | str:
    """'auto' or 'RAW:ID,RAW:ID' -> the `label_map` argument of `import_nifti`."""
    if text == "auto":
        return text
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return {int(raw): int(cid) for raw, cid in pairs}
    except ValueError:
        raise RaysegbgError(
            f"--label-map {text!r} is invalid: use 'auto' or RAW:ID pairs like 2001:1,2002:1"
        ) from None


def cmd_import_nifti(args: argparse.Namespace) -> int:
    from raysegbg.data.nifti import import_nifti

    if len(args.image) != len(args.label):
        raise RaysegbgError(
            f"got {len(args.image)} --image and {len(args.label)} --label: give one --label "
            f"per --image, in the same order"
        )
    meta = import_nifti(
        list(zip(args.image, args.label, strict=True)),
        args.out,
        axis=args.axis,
        binarize=args.binarize,
        label_map=parse_label_map(args.label_map),
        label_names=args.label_names,
        size=_size(args.size),
        slab=args.slab,
        gap=args.gap,
        val=args.val,
        test=args.test,
        seed=args.seed,
        min_foreground=args.min_foreground,
        resample_labels=args.resample_labels,
        labeled_fraction=args.labeled_fraction,
        name=args.name,
        overwrite=args.overwrite,
        ignore_value=args.ignore_value,
        split_file=args.split_file,
    )
    return _done(meta, args.out)


def _frequency_table(path: Path, meta: DatasetMeta) -> list[str]:
    splits = [s for s in SPLITS if meta.labeled.get(s, 0) > 0]
    freqs = {s: class_frequencies(path, s) for s in splits}
    width = max(len(c) for c in meta.classes) + 5
    lines = [f"{'class':<{width}}" + "".join(f"{s + ' px %':>12}" for s in splits)]
    for k, cls in enumerate(meta.classes):
        cells = [100.0 * freqs[s][k] / max(1, freqs[s].sum()) for s in splits]
        lines.append(f"{f'{k:>3} {cls}':<{width}}" + "".join(f"{c:>12.2f}" for c in cells))
    return lines


def _summary(value: Any) -> str:
    if isinstance(value, dict) and len(value) > 6:
        return f"{{{len(value)} entries}}"
    if isinstance(value, list) and len(value) > 3:
        return f"[{len(value)} items]"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 90 else text[:87] + "..."


def format_info(path: Path) -> str:
    """The `data info` report as text."""
    meta = read_meta(path)
    size = "x".join(map(str, meta.image_size)) if meta.image_size else "mixed"
    lines = [
        f"dataset   {meta.name}  ({path})",
        f"images    {size}, {meta.channels} channel(s); {meta.num_classes} classes; "
        f"ignore index {meta.ignore_index}; format v{meta.format_version}",
        f"shards    {len(meta.shards)}",
        "",
        f"{'split':<8}{'samples':>9}{'labeled':>9}",
        *(f"{s:<8}{meta.splits.get(s, 0):>9}{meta.labeled.get(s, 0):>9}" for s in SPLITS),
        f"{'total':<8}{sum(meta.splits.values()):>9}{sum(meta.labeled.values()):>9}",
        "",
        *_frequency_table(path, meta),
        "",
        "provenance",
        *(f"  {k}: {_summary(v)}" for k, v in meta.provenance.items()),
    ]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    print(format_info(args.path))
    return 0
