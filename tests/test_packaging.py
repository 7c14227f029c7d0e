"""The built wheel: one top-level name (``diffclip``), the programs as sub-packages and console scripts."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_one_top_level_package_and_the_console_scripts(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("diffclip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"diffclip"}, top
    for module in ("diffclip/training/main.py", "diffclip/training/make_shards.py", "diffclip/eval/__main__.py",
                   "diffclip/eval/zeroshot.py", "diffclip/configs/DiffCLIP-ViT-B-16.json",
                   "diffclip/eval/prompts/en_zeroshot_classification_templates.json"):
        assert module in names, module
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("diffclip-train = diffclip.training.main:cli", "diffclip-make-shards",
                   "diffclip-eval = diffclip.eval.__main__:main"):
        assert script in entry_points, script


def test_programs_run_as_modules_and_from_the_checkout():
    for cmd in ([sys.executable, "-m", "diffclip.training.main", "--help"],
                [sys.executable, str(ROOT / "training" / "main.py"), "--help"],
                [sys.executable, "-m", "diffclip.eval", "zeroshot", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        assert r.returncode == 0, (cmd, r.stderr)
        assert "--model" in r.stdout, cmd
