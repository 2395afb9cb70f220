"""The README's "Your own data, end to end" block, run command for command on a folder of
0/255 PNG masks: import, info, train (on the session's Ray), eval, predict, export."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysegbg.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- walkthrough:start -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->",
                      text, re.S)  # fmt: skip
    assert found, "README.md lost its walkthrough block"
    lines = found.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.strip()]


def lesion_pictures(folder: Path, count: int, seed: int, masks: Path | None = None) -> None:
    """64 px textured colour images with a bright disc; its mask saved as 0/255."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    for i in range(count):
        image = rng.integers(40, 120, (64, 64, 3), dtype=np.uint8)
        cy, cx, r = rng.integers(18, 46), rng.integers(18, 46), rng.integers(6, 14)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[disc] = rng.integers(180, 250, 3, dtype=np.uint8)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"case{i:02d}.png")
        if masks is not None:
            masks.mkdir(parents=True, exist_ok=True)
            Image.fromarray(disc.astype(np.uint8) * 255).save(masks / f"case{i:02d}.png")


def test_the_readme_walkthrough_runs_as_written(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    lesion_pictures(tmp_path / "my_data" / "images", 30, 0, tmp_path / "my_data" / "masks")
    lesion_pictures(tmp_path / "new_images", 3, 1)

    printed = {}
    for args in readme_commands():
        assert args[0] == "raysegbg", args
        assert main(args[1:]) == 0, args
        printed[" ".join(args[1:3])] = capsys.readouterr().out

    assert "read 0 as class 0 'background' and 255 as class 1 'lesion'" in printed["data import"]
    share = re.search(r"1 lesion\s+([\d.]+)", printed["data info"])
    assert share and float(share.group(1)) > 0, printed["data info"]
    assert (tmp_path / "runs" / "lesions" / "config.yaml").is_file()
    assert "confusion" in printed["eval --run"].lower()
    masks = sorted((tmp_path / "new_masks").glob("*.png"))
    assert [m.name for m in masks] == ["case00.png", "case01.png", "case02.png"]
    assert set(np.unique(np.array(Image.open(masks[0])))) <= {0, 1}
    assert len(list((tmp_path / "new_masks" / "overlay").glob("*.png"))) == 3
    assert (tmp_path / "lesions.onnx").is_file() and (tmp_path / "lesions.onnx.json").is_file()
