"""Finding TPU-MLIR and running its tools.

Two installations are supported: the `tpu-mlir` wheel (its tools are console scripts next to
this Python, in the venv's bin/), or a source build selected with --tpu_mlir_path, whose
envsetup.sh is sourced once in bash and whose resulting environment is used for every tool.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mllama_tpu.errors import UserError

TOOLS = ("model_transform.py", "model_deploy.py", "model_tool")


@dataclass(frozen=True)
class Toolchain:
    env: dict[str, str]
    paths: dict[str, str]  # tool name -> absolute path
    version: str
    origin: str  # where it was found, for logs and the report
    wheel: bool  # the pip package (tools run through its console scripts), else a source build
    python: str  # interpreter of that installation

    def cmd(self, tool: str, *args: str) -> list[str]:
        return [self.paths[tool], *args]


def _sourced_env(tpu_mlir_path: Path) -> dict[str, str]:
    script = tpu_mlir_path / "envsetup.sh"
    if not script.is_file():
        raise UserError(f"no envsetup.sh in {tpu_mlir_path}; pass --tpu_mlir_path the root of a TPU-MLIR "
                        f"source build, or leave it out to use the installed tpu-mlir")
    # envsetup.sh locates the build from its own directory, so source it from there.
    proc = subprocess.run(["bash", "-c", 'cd "$1" && source ./envsetup.sh >/dev/null 2>&1 && env -0',
                           "bash", str(tpu_mlir_path)], capture_output=True)
    if proc.returncode != 0:
        raise UserError(f"sourcing {script} failed (exit {proc.returncode}); check that TPU-MLIR build")
    env = {}
    for item in proc.stdout.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return env


def find_toolchain(tpu_mlir_path: str | Path | None = None) -> Toolchain:
    if tpu_mlir_path:
        root = Path(tpu_mlir_path).resolve()
        env = _sourced_env(root)
        search = env.get("PATH", "")
        origin = f"source build {root}"
    else:
        env = dict(os.environ)
        # The wheel's console scripts live beside this interpreter (venv bin/), even when the
        # venv is not activated.
        search = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PATH"] = search
        origin = "installed tpu-mlir"
    paths = {}
    for tool in TOOLS:
        found = shutil.which(tool, path=search)
        if not found:
            how = ("that build does not provide it (was it built and installed?)" if tpu_mlir_path
                   else "pip install tpu-mlir==1.30.2 (see scripts/setup_env.sh), or pass --tpu_mlir_path")
            raise UserError(f"TPU-MLIR not found: no {tool} on PATH ({origin}); {how}")
        paths[tool] = found
    python = sys.executable if not tpu_mlir_path else (shutil.which("python3", path=search) or sys.executable)
    return Toolchain(env, paths, _version(paths["model_deploy.py"], env), origin, not tpu_mlir_path, python)


def _version(deploy: str, env: dict[str, str]) -> str:
    try:
        proc = subprocess.run([deploy, "--version"], capture_output=True, text=True, env=env, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"TPU-MLIR at {deploy} does not run ({e}); reinstall it or pass --tpu_mlir_path") from None
    text = (proc.stdout + proc.stderr).strip().splitlines()
    # Prints a log line, then "model_deploy.py v1.30.2-20260831".
    return text[-1].split()[-1] if text else "unknown"
