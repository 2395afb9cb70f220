"""Helpers shared by the method benchmarks: datasets, seeded runs, a mean ± std table."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from raysegbg.config import load_config
from raysegbg.inference import evaluate_run
from raysegbg.local import train_local

MRICRON = Path("/usr/share/mricron/templates")

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


def make_mri_lobes(out: Path, size: int = 64) -> Path:
    from raysegbg.data.nifti import import_nifti

    mapping, _ = aal_lobe_map()
    pairs = [(MRICRON / "ch2.nii.gz", MRICRON / "aal.nii.gz")]
    import_nifti(pairs, out, label_map=mapping, size=(size, size), slab=8, min_foreground=0.02,
                 name="ch2_aal_lobes")  # fmt: skip
    return out


def make_mri_brain(out: Path, size: int = 64) -> Path:
    """mricron's ch2 head MRI sliced into 2-D images, with the ch2bet brain as foreground."""
    from raysegbg.data.nifti import import_nifti

    pairs = [(MRICRON / "ch2.nii.gz", MRICRON / "ch2bet.nii.gz")]
    import_nifti(pairs, out, binarize=True, size=(size, size), min_foreground=0.01,
                 name="ch2_brain")  # fmt: skip
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
) -> list[tuple[str, str, dict[str, list[float]]]]:
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


def table(rows, metrics: list[str], scale: float = 100.0) -> str:
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
