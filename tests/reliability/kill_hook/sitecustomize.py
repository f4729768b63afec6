"""Test-only fault injection for the nightly's child processes: with this directory on PYTHONPATH and
WAFERSEG_KILL_AT=module:function:calls_before set, every Python process (the flow, DVC, each stage's
`waferseg` command) SIGKILLs the flow's process group (WAFERSEG_KILL_PGID, set by the flow, the first
process) and its own the moment `function`
is called once more than calls_before times: a power cut at that step, wherever the step runs."""

import importlib.abc
import importlib.util
import os
import signal
import sys

TARGET = os.environ.get("WAFERSEG_KILL_AT")


def _kill_everything() -> None:
    os.killpg(int(os.environ["WAFERSEG_KILL_PGID"]), signal.SIGKILL)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _patch(module) -> None:
    _, name, calls_before = TARGET.split(":")
    real, calls = getattr(module, name), []

    def killed_at_this_step(*args, **kwargs):
        calls.append(1)
        if len(calls) > int(calls_before):
            _kill_everything()
        return real(*args, **kwargs)

    setattr(module, name, killed_at_this_step)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when the target module is imported, patches it right after it executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET.split(":")[0]:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        execute = spec.loader.exec_module

        def exec_and_patch(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if TARGET:
    os.environ.setdefault("WAFERSEG_KILL_PGID", str(os.getpgid(0)))  # the first process, the flow, leads the group
    sys.meta_path.insert(0, _PatchOnImport())
