"""`passes/` is installed as `prunefx.passes`, in regular and editable installs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_passes() -> None:
    import prunefx.passes

    assert Path(prunefx.passes.__file__).resolve() == ROOT / "passes" / "__init__.py"


def test_regular_install_maps_passes(tmp_path: Path) -> None:
    # build from a copy of the sources: a stale build/ in the checkout must not leak in
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "prunefx", "passes"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy2
        copy(ROOT / item, src / item, **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / item).is_dir() else {}))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(src)],
        check=True, capture_output=True, text=True,
    )
    subpackages = {init.parent.name for init in (ROOT / "prunefx").glob("*/__init__.py")} | {"passes"}
    missing = sorted(p for p in subpackages if not (target / "prunefx" / p / "__init__.py").is_file())
    assert not missing, f"pyproject.toml's packages list lacks {missing}"
    assert (target / "prunefx" / "passes" / "fix_shape_args.py").is_file()
    code = "import prunefx, prunefx.passes as p; print(p.__file__); print(prunefx.passes.DEFAULT_PIPELINE.passes[0].name)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env, cwd=tmp_path)
    lines = out.stdout.split()
    assert lines[0].startswith(str(target)), lines
    assert lines[1] == "SliceTensors"


def test_demo_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--model", "resnet18", "--size", "64"],
        check=True, capture_output=True, text=True, timeout=300,
    )
    assert "exact" in out.stdout and "FLOPs" in out.stdout
