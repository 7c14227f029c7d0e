"""The built wheel: one top-level name (``diffclip``), the programs as sub-packages and console scripts, core
requirements as ranges with the programs' needs in extras, and a core-only install that still creates, tokenizes
and loads weights from a hub. ``constraints.txt`` pins what CI tests."""

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest
import torch
from hf_server import HubServer
from packaging.requirements import Requirement

import diffclip

ROOT = Path(__file__).resolve().parents[1]
# what only the programs import (training/, eval/, scripts/): a core install must work without any of them
NOT_CORE = {"tensorboard": "tensorboard", "scikit-learn": "sklearn", "matplotlib": "matplotlib", "scipy": "scipy",
            "webdataset": "webdataset", "braceexpand": "braceexpand"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("diffclip-*.whl")
    return path


def _requires(wheel: Path) -> tuple[list[Requirement], dict[str, set[str]]]:
    """The wheel's core requirements and, per extra, the names (canonical) that extra adds."""
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    core, extras = [], {}
    for line in meta.get_all("Requires-Dist"):
        req = Requirement(line)
        if req.marker is None:
            core.append(req)
        for extra in meta.get_all("Provides-Extra"):
            if req.marker is not None and req.marker.evaluate({"extra": extra}):
                extras.setdefault(extra, set()).add(_canon(req.name))
    return core, extras


def _closure(reqs: list[Requirement]) -> dict[str, metadata.Distribution]:
    """The installed distributions (of this interpreter) that ``reqs`` pull, transitively, with their extras."""
    installed = {_canon(d.metadata["Name"]): d for d in metadata.distributions()}
    found, todo, seen = {}, [(r, frozenset(r.extras)) for r in reqs], set()
    while todo:
        req, extras = todo.pop()
        name = _canon(req.name)
        if (name, extras) in seen or name not in installed:
            continue
        seen.add((name, extras))
        found[name] = dist = installed[name]
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((sub, frozenset(sub.extras)))
    return found


def test_wheel_has_one_top_level_package_and_the_console_scripts(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"diffclip"}, top
    for module in ("diffclip/training/main.py", "diffclip/training/make_shards.py", "diffclip/training/finetune.py",
                   "diffclip/eval/__main__.py", "diffclip/eval/clip_benchmark.py",
                   "diffclip/eval/zeroshot.py", "diffclip/configs/DiffCLIP-ViT-B-16.json",
                   "diffclip/eval/prompts/en_zeroshot_classification_templates.json"):
        assert module in names, module
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("diffclip-train = diffclip.training.main:cli", "diffclip-make-shards",
                   "diffclip-finetune = diffclip.training.finetune:cli", "diffclip-study = diffclip.training.study:cli",
                   "diffclip-eval = diffclip.eval.__main__:main"):
        assert script in entry_points, script


def test_core_requirements_are_ranges_and_the_programs_needs_are_extras(wheel):
    core, extras = _requires(wheel)
    names = {_canon(r.name) for r in core}
    assert {"torch", "torchvision", "timm", "open-clip-torch", "huggingface-hub", "safetensors"} <= names
    assert not names & set(NOT_CORE), names & set(NOT_CORE)
    pinned = [str(r) for r in core if any(s.operator in ("==", "===", "~=") for s in r.specifier)]
    assert not pinned, pinned
    assert {"webdataset", "braceexpand", "tensorboard", "scipy"} <= extras["train"]
    assert {"scikit-learn", "matplotlib"} <= extras["eval"]
    assert {"diffclip", "pytest"} <= extras["test"]  # diffclip[train,eval]: `make test` installs everything


def test_constraints_pin_every_installed_dependency_at_its_installed_version():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[_canon(req.name)] = spec.version
    pulled = _closure([Requirement("diffclip[test]")])
    wrong = {n: (d.version, pins.get(n)) for n, d in pulled.items()
             if n not in ("diffclip", "pip", "setuptools") and pins.get(n) != d.version}
    assert not wrong, f"constraints.txt is stale (name: (installed, pinned)), run `make constraints`: {wrong}"
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


_CORE_SCRIPT = """
import importlib.util, sys
present = [m for m in {absent!r} if importlib.util.find_spec(m) is not None]
assert not present, f"not a core-only environment: {{present}}"
import torch
import diffclip
assert diffclip.__file__.startswith(sys.prefix), diffclip.__file__
name = "DiffCLIP-Tiny-64"
model, _, preprocess = diffclip.create_model_and_transforms("hf-hub:acme/diffclip-tiny")
tokens = diffclip.get_tokenizer(name)(["a red circle", "two blue squares"])
from PIL import Image
image = preprocess(Image.new("RGB", (80, 60), (200, 30, 30))).unsqueeze(0)
with torch.no_grad():
    torch.save({{"image": model.encode_image(image), "text": model.encode_text(tokens), "tokens": tokens}}, sys.argv[1])
"""


def _core_only_venv(wheel: Path, venv: Path) -> Path:
    """A venv holding the wheel (installed by pip, no dependencies) and, linked from this interpreter's
    site-packages, exactly the distributions that the wheel's core ``Requires-Dist`` pull: what ``pip install
    diffclip`` would put there, at the versions CI tests, without downloading torch again."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib"))
    core, _ = _requires(wheel)
    keep = {n: d for n, d in _closure(core).items() if n != "diffclip"}
    assert not set(keep) & set(NOT_CORE), set(keep) & set(NOT_CORE)
    # a path is linked whole when no other distribution has a file under it (shared namespace folders: by parts)
    foreign = set()
    for dist in metadata.distributions():
        if _canon(dist.metadata["Name"]) not in keep:
            for f in dist.files or []:
                parts = f.parts
                foreign.update(parts[:i] for i in range(1, len(parts) + 1))
    dest = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    linked = set()
    for dist in keep.values():
        for f in dist.files or []:
            parts = f.parts
            if parts[0] == ".." or "__pycache__" in parts:
                continue
            prefix = next((parts[:i] for i in range(1, len(parts) + 1) if parts[:i] not in foreign), parts)
            if any(prefix[:i] in linked for i in range(1, len(prefix) + 1)):
                continue
            (dest / Path(*prefix)).parent.mkdir(parents=True, exist_ok=True)
            (dest / Path(*prefix)).symlink_to(site / Path(*prefix))
            linked.add(prefix)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    # pip's own check: every installed distribution's requirements (diffclip's ranges included) are met
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return venv / "bin" / "python"


def test_core_install_creates_tokenizes_and_loads_hub_weights_without_the_programs_dependencies(wheel, tmp_path):
    python = _core_only_venv(wheel, tmp_path / "core")
    torch.manual_seed(0)
    model = diffclip.create_model("DiffCLIP-Tiny-64").eval()
    model.save_pretrained(tmp_path / "hub" / "acme" / "diffclip-tiny")
    out = tmp_path / "out.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "HF_"))}
    with HubServer(tmp_path / "hub") as server:
        r = subprocess.run([str(python), "-I", "-c", _CORE_SCRIPT.format(absent=sorted(NOT_CORE.values())), str(out)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env={**env, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    assert any("/acme/diffclip-tiny/resolve/main/model.safetensors" in q for q in server.requests)
    got = torch.load(out, weights_only=True)
    _, _, preprocess = diffclip.create_model_and_transforms("DiffCLIP-Tiny-64")
    from PIL import Image
    image = preprocess(Image.new("RGB", (80, 60), (200, 30, 30))).unsqueeze(0)
    tokens = diffclip.get_tokenizer("DiffCLIP-Tiny-64")(["a red circle", "two blue squares"])
    with torch.no_grad():
        torch.testing.assert_close(got["image"], model.encode_image(image), atol=0, rtol=0)
        torch.testing.assert_close(got["text"], model.encode_text(tokens), atol=0, rtol=0)
    assert torch.equal(got["tokens"], tokens)


def test_programs_run_as_modules_and_from_the_checkout():
    for cmd in ([sys.executable, "-m", "diffclip.training.main", "--help"],
                [sys.executable, str(ROOT / "training" / "main.py"), "--help"],
                [sys.executable, "-m", "diffclip.eval", "zeroshot", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        assert r.returncode == 0, (cmd, r.stderr)
        assert "--model" in r.stdout, cmd
