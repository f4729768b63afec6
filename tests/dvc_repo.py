"""Git work trees with DVC initialised and a local remote, like the project's own, for tests that version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(cwd: Path, *command: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def git(cwd: Path, *args: str) -> str:
    return run(cwd, "git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args)


def dvc(cwd: Path, *args: str) -> str:
    return run(cwd, sys.executable, "-m", "dvc", *args)


def dvc_repo(root: Path, remote: Path) -> Path:
    """`root`: git init, DVC init, the local remote `remote` as default, committed."""
    root.mkdir(parents=True)
    git(root, "init", "-q")
    (root / ".gitignore").write_text("/data/\n/inbox/\n/build/\n/reports/\n")
    dvc(root, "init", "-q")
    dvc(root, "remote", "add", "-d", "local", str(remote))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return root
