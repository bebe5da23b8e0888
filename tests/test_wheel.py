"""Installed as users install it: the built wheel, non-editable, in a fresh virtual environment,
run from a directory outside the repository (so nothing can come from the checkout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_and_runs_the_demo_outside_the_repository(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("ahf-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    for config in (REPO / "configs").rglob("*"):
        if config.suffix in {".yaml", ".json"}:  # every default config travels with the package
            assert f"ahf/configs/{config.relative_to(REPO / 'configs').as_posix()}" in shipped
    for folder in ("ahf/report/templates", "ahf/serve/templates", "ahf/serve/static"):  # pages need them
        assert {f"{folder}/{p.name}" for p in (REPO / folder).iterdir() if p.is_file()} <= shipped, folder

    venv = tmp_path / "venv"
    # a user's shell: none of this test process's settings (DeepSpeed's rendezvous port is taken by it)
    leave_out = {"PYTHONPATH", "VIRTUAL_ENV", "AHF_CONFIG_DIR", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK",
                 "WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in leave_out}
    env |= {"AHF_VENV": str(venv), "AHF_INSTALL": f"{wheel}[index,train]", "HF_HUB_OFFLINE": "1"}
    subprocess.run(["bash", str(REPO / "scripts" / "setup.sh")], check=True, env=env, cwd=tmp_path)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    ahf = venv / "bin" / "ahf"
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import ahf.configs, mining; "
                            "print(ahf.configs.__file__); print(mining.__file__)"],
                           check=True, env=env, cwd=outside, capture_output=True, text=True).stdout.split()
    assert all(str(venv) in path for path in where)  # the installed copy, not the checkout
    version = subprocess.run([str(ahf), "--version"], check=True, env=env, cwd=outside,
                             capture_output=True, text=True).stdout
    assert version.strip() == f"ahf {wheel.name.split('-')[1]}"
    demo = subprocess.run([str(ahf), "demo", "--posts", "30", "--train-steps", "2", "--json"],
                          env=env, cwd=outside, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr[-3000:]
    result = json.loads(demo.stdout)
    steps = result["steps"]
    assert result["ok"] and (outside / result["out"]).is_dir()
    assert (outside / result["report"]["html"]).stat().st_size > 10_000  # the report's templates were found
    assert sum(steps["query acts"]["acts"].values()) == steps["threads and turns"]["turns"]  # acts.yaml found
    trained = steps["train reward model"]  # the DeepSpeed JSON found
    assert trained["train_used"] > 0 and (outside / trained["out"] / "model.safetensors").is_file()
