"""The environment the setup script builds: TPU-MLIR tools run, re-runs reuse it, no 3.10 is one line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mllama_tpu import REPO_ROOT

VENV_BIN = Path(sys.executable).parent


def test_running_in_project_venv():
    assert sys.version_info[:2] == (3, 10)
    assert Path(sys.prefix).resolve() == (REPO_ROOT / ".venv").resolve()


def test_tpu_mlir_tools_start():
    # Before the glibc fix each of these died with "GLIBC_2.36 not found".
    for tool in ("model_transform.py", "model_deploy.py"):
        r = subprocess.run([str(VENV_BIN / tool), "--help"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "usage:" in r.stdout
    r = subprocess.run([str(VENV_BIN / "model_tool")], capture_output=True, text=True, timeout=60)
    assert "--combine" in r.stdout + r.stderr


def test_bundled_glibc_is_moved_aside():
    import tpu_mlir

    third_party = Path(tpu_mlir.__file__).parent / "lib" / "third_party"
    for lib in ("libc.so.6", "libm.so.6", "libpthread.so.0"):
        assert not (third_party / lib).exists()


def test_rerun_reuses_the_environment():
    stamp = REPO_ROOT / ".venv" / ".requirements.sha256"
    before = stamp.stat().st_mtime
    t0 = time.monotonic()
    env = dict(os.environ, MLLAMA_SKIP_ENGINE_BUILD="1")
    r = subprocess.run([str(REPO_ROOT / "scripts" / "setup_env.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert stamp.stat().st_mtime == before, "unchanged requirements must not reinstall"
    assert time.monotonic() - t0 < 60


def test_missing_python310_is_one_clear_line(tmp_path: Path):
    # A fake checkout with no .venv, and a PATH on which no Python 3.10 (nor pyenv) can be found.
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO_ROOT / "scripts" / "setup_env.sh", tmp_path / "scripts" / "setup_env.sh")
    for reqs in ("requirements.txt", "requirements-nodeps.txt"):
        shutil.copy(REPO_ROOT / reqs, tmp_path / reqs)
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("bash", "sha256sum", "cut", "cat", "dirname", "mkdir", "mv", "env"):
        os.symlink(shutil.which(tool), bare / tool)
    r = subprocess.run(["bash", str(tmp_path / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                       env={"PATH": str(bare), "HOME": str(tmp_path)}, timeout=60)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Python 3.10 is required" in lines[0], r.stderr
    assert not (tmp_path / ".venv").exists()
