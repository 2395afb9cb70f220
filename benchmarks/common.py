"""Helpers shared by the benchmarks: datasets, seeded runs, a mean ± std table, goal checks."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raysegbg.config import load_config
from raysegbg.inference import evaluate_run
from raysegbg.local import train_local

MRICRON = Path("/usr/share/mricron/templates")
MRI_TASKS = {"mri-brain": "ch2bet.nii.gz", "mri-lobes": "aal.nii.gz"}  # task -> file it needs

# AAL regions (mricron's aal.nii.txt names, hemisphere suffix dropped) grouped into lobes.
LOBES = {
    "frontal": ("Precentral", "Frontal", "Supp_Motor", "Olfactory", "Rectus", "Paracentral",
                "Rolandic"),
    "parietal": ("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus"),
    "temporal": ("Temporal", "Heschl", "Fusiform"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital"),
    "limbic": ("Insula", "Cingulum", "Hippocampus", "ParaHippocampal", "Amygdala"),
    "subcortical": ("Caudate", "Putamen", "Pallidum", "Thalamus"),
    "cerebellum": ("Cerebelum", "Vermis"),
}  # fmt: skip

# What `compare` returns: (task, variant, {metric: one value per seed, a fraction}).
Rows = list[tuple[str, str, dict[str, list[float]]]]


def aal_lobe_map() -> tuple[dict[int, int], list[str]]:
    """Raw AAL label value -> lobe class id (1..7), from the atlas' own name table."""
    mapping = {}
    for line in (MRICRON / "aal.nii.txt").read_text().splitlines():
        if len(line.split()) < 2:
            continue
        value, name = line.split()[:2]
        lobe = next(i for i, keys in enumerate(LOBES.values(), 1) if name.startswith(keys))
        mapping[int(value)] = lobe
    return mapping, ["background", *LOBES]


def make_mri_lobes(out: Path, size: int = 64, silhouette: bool = False) -> Path:
    """mricron's ch2 head MRI sliced into 2-D images, with the AAL atlas grouped into lobes
    (`silhouette`: the image is the head's filled outline instead, the same slices, ids and
    splits: nothing inside the head, so no lobe, is visible)."""
    from raysegbg.data.nifti import import_nifti

    mapping, _ = aal_lobe_map()
    image = MRICRON / "ch2.nii.gz"
    if silhouette:
        image = head_silhouette(image, out.parent / f"{out.name}-silhouette" / image.name)
    import_nifti([(image, MRICRON / "aal.nii.gz")], out, label_map=mapping, size=(size, size),
                 slab=8, min_foreground=0.02, name="ch2_aal_lobes")  # fmt: skip
    return out


def head_silhouette(volume: Path, out: Path) -> Path:
    """A volume of the head's outline: per axial slice and row, 1 from the first to the last
    voxel brighter than the tissue cut (half the 60th intensity percentile), 0 elsewhere."""
    import nibabel as nib

    source = nib.load(volume)
    x = np.asarray(source.dataobj, dtype=np.float32)
    head = x > 0.5 * np.percentile(x, 60)
    index = np.arange(x.shape[1])[None, :, None]
    first = np.where(head, index, x.shape[1]).min(1, keepdims=True)
    last = np.where(head, index, -1).max(1, keepdims=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    filled = ((index >= first) & (index <= last)).astype(np.float32)
    nib.save(nib.Nifti1Image(filled, source.affine), out)
    return out


def make_mri_brain(out: Path, size: int = 64, min_foreground: float = 0.01, slab: int = 16) -> Path:
    """mricron's ch2 head MRI sliced into 2-D images, with the ch2bet brain as foreground
    (`min_foreground` 0 keeps the slices of head without brain too; `slab`: consecutive
    slices that go whole to one split)."""
    from raysegbg.data.nifti import import_nifti

    pairs = [(MRICRON / "ch2.nii.gz", MRICRON / "ch2bet.nii.gz")]
    import_nifti(pairs, out, binarize=True, size=(size, size), slab=slab,
                 min_foreground=min_foreground, name="ch2_brain")  # fmt: skip
    return out


def run(overrides: list[str], seed: int, root: Path, split: str = "test") -> dict[str, float]:
    """Train in-process (no Ray: this compares methods, not infrastructure) and evaluate."""
    torch.set_num_threads(torch.get_num_threads())
    name = f"r{len(list(root.iterdir()))}"
    cfg = load_config(None, [*overrides, f"train.seed={seed}", f"logging.storage_path={root}",
                             f"logging.name={name}"])  # fmt: skip
    train_local(cfg, root / name, log=lambda line: None)
    return evaluate_run(root / name, split)


def compare(
    tasks: dict[str, list[str]],
    variants: dict[str, list[str]],
    seeds: list[int],
    metrics: list[str],
    log: Callable[[str], None] = print,
) -> Rows:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task, task_overrides in tasks.items():
            for variant, overrides in variants.items():
                values: dict[str, list[float]] = {m: [] for m in metrics}
                for seed in seeds:
                    start = time.perf_counter()
                    result = run([*task_overrides, *overrides], seed, Path(tmp))
                    for m in metrics:
                        values[m].append(result[m])
                    shown = "  ".join(f"{m} {result[m]:.4f}" for m in metrics)
                    log(f"{task:<12} {variant:<14} seed {seed}  {shown}  "
                        f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
                rows.append((task, variant, values))
    return rows


def table(rows: Rows, metrics: list[str], scale: float = 100.0) -> str:
    head = f"{'task':<14}{'variant':<16}" + "".join(f"{m + ' (mean ± std)':>24}" for m in metrics)
    lines = [head, "-" * len(head)]
    for task, variant, values in rows:
        cells = ""
        for m in metrics:
            v = [x * scale for x in values[m]]
            std = statistics.stdev(v) if len(v) > 1 else 0.0
            cells += f"{statistics.mean(v):>15.2f} ± {std:<6.2f}"
        lines.append(f"{task:<14}{variant:<16}{cells}")
    return "\n".join(lines)


def finite_mean(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN: none is)."""
    finite = [v for v in values if v == v]
    return statistics.mean(finite) if finite else float("nan")


def cell(values: list[float], scale: float = 100.0) -> str:
    """'mean ± std' of the non-NaN values, scaled ('-' when there is none)."""
    v = [x * scale for x in values if x == x]
    if not v:
        return f"{'-':>15}"
    std = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):>8.2f} ± {std:<5.2f}"


def means(rows: Rows, metric: str, scale: float = 100.0) -> dict[str, dict[str, float]]:
    """task -> variant -> mean of `metric` over seeds, scaled as `table` shows it."""
    out: dict[str, dict[str, float]] = {}
    for task, variant, values in rows:
        out.setdefault(task, {})[variant] = scale * statistics.mean(values[metric])
    return out


# -- goals: printed under the table; a missed one makes the script exit 1 -------------------
@dataclass(frozen=True)
class Goal:
    """One goal of a benchmark and whether this run met it; `detail` says by how much."""

    description: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"goal {'met' if self.ok else 'MISSED'}: {self.description} ({self.detail})"


PROBE_HELP = (
    "validation only, for trying settings: the test split is not read and no goal is checked "
    "(the run that makes the table reads it once)"
)
PROBE_LINE = "probe: validation only; the test split was not read, no goal checked"


def need_mricron(tasks: Iterable[str]) -> None:
    """Stop before any work when an MRI task is asked for and mricron-data is missing, rather
    than check the goals on fewer tasks."""
    for task in tasks:
        if task in MRI_TASKS and not (MRICRON / MRI_TASKS[task]).is_file():
            sys.exit(f"{task} needs mricron-data ({MRICRON / MRI_TASKS[task]} is missing): "
                     f"apt-get install mricron-data, or leave {task} out of the tasks")  # fmt: skip


def check(
    description: str,
    value: float,
    bound: float,
    *,
    lower: bool = False,
    strict: bool = False,
    digits: int = 2,
) -> Goal:
    """Goal `value >= bound` (`lower`: `<=`; `strict`: `>` / `<`), with the margin as detail."""
    margin = bound - value if lower else value - bound
    ok = margin > 0 if strict else margin >= 0
    how = "margin" if ok else "missed by"
    detail = f"{value:.{digits}f} vs {bound:.{digits}f}, {how} {abs(margin):.{digits}f}"
    return Goal(description, ok, detail)


def control_note(task: str, worse: bool, detail: str) -> str:
    """Information, not a goal: does switching the method's mechanism off cost accuracy?"""
    same = "control matches the method: the gain is the architecture's"
    verdict = "mechanism matters" if worse else same
    return f"info {task}: {detail}: {verdict}"


def report(goals: list[Goal], notes: Iterable[str] = ()) -> int:
    """Print every goal's line, then the notes; the exit code: 1 if any goal was missed."""
    print()
    for goal in goals:
        print(goal.line())
    for note in notes:
        print(note)
    return 0 if all(goal.ok for goal in goals) else 1
