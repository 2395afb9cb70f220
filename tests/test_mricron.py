"""The real MRI volumes of Debian's mricron-data (installed by .ci/run when apt works)."""

from pathlib import Path

import pytest

from raysegbg.cli import main
from raysegbg.data.format import read_meta, read_split

T = Path("/usr/share/mricron/templates")
pytestmark = pytest.mark.skipif(
    not (T / "ch2.nii.gz").is_file(),
    reason="mricron-data not installed (apt-get install mricron-data)",
)


def slice_index(sample_id: str) -> int:
    return int(sample_id.rsplit("_z", 1)[1])


def test_brain_mask_import(tmp_path, capsys):
    out = tmp_path / "ch2_brain"
    args = ["data", "import", "nifti", "--image", T / "ch2.nii.gz", "--label", T / "ch2bet.nii.gz",
            "--binarize", "--size", "64", "64", "--min-foreground", "0.01", "--name", "ch2_brain",
            "--out", out]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    meta = read_meta(out)
    assert meta.num_classes == 2 and meta.channels == 1 and tuple(meta.image_size) == (64, 64)
    assert all(meta.splits[s] > 0 for s in ("train", "val", "test"))
    slices = {s: {slice_index(i) for i in read_split(out, s).column("id").to_pylist()}
              for s in ("train", "val", "test")}  # fmt: skip
    for a in slices:
        for b in slices:
            if a != b:  # neighbouring slices never straddle two splits
                assert not any(abs(x - y) <= 1 for x in slices[a] for y in slices[b])
    assert main(["data", "info", str(out)]) == 0
    assert "foreground" in capsys.readouterr().out


def test_atlas_import(tmp_path):
    out = tmp_path / "ch2_aal"
    args = ["data", "import", "nifti", "--image", T / "ch2.nii.gz", "--label", T / "aal.nii.gz",
            "--size", "64", "64", "--min-foreground", "0.01", "--slab", "8",
            "--out", out]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    assert read_meta(out).num_classes > 100  # the AAL regions, remapped to contiguous ids
