"""MCIBI versus the baseline and versus a memory frozen at its initial value.

Same network, data, schedule and seeds; only the method changes. mIoU on the test split
(×100), mean ± std over seeds, on the built-in `ambiguous` multi-class set (local appearance
ambiguous, class statistics consistent across the dataset) and on the real MRI atlas task
(mricron-data ch2 + AAL grouped into 7 lobes), when mricron-data is installed.

    python benchmarks/method_mcibi.py [--seeds 0 1 2] [--epochs 6]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import MRICRON, compare, make_mri_lobes, table

from raysegbg.data.synthetic import make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    common = ["model.encoder_depth=4", "model.decoder_channels=[64,32,16,16]",
              f"train.epochs={args.epochs}", "train.batch_size=16", "train.steps_per_epoch=30",
              f"data.crop_size={args.size}", "logging.image_every=1000"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tasks = {}
        data = make_dataset("ambiguous", Path(tmp) / "amb", n=600, size=args.size, seed=0)
        tasks["ambiguous"] = [*common, f"data.path={Path(tmp) / 'amb'}"]
        if (MRICRON / "aal.nii.gz").is_file():
            make_mri_lobes(Path(tmp) / "mri", args.size)
            tasks["mri-lobes"] = [*common, f"data.path={Path(tmp) / 'mri'}"]
        variants = {
            "baseline": ["method.name=baseline", "method.baseline.dice_weight=0"],
            "mcibi": ["method.name=mcibi"],
            "mcibi-frozen": ["method.name=mcibi", "method.mcibi.update=false"],
        }
        rows = compare(tasks, variants, args.seeds, ["miou", "fg_dice"])
    print(f"\n{data.name}: {data.splits}; seeds {args.seeds}; {args.epochs} epochs x 30 steps\n")
    print(table(rows, ["miou", "fg_dice"]))


if __name__ == "__main__":
    main()
