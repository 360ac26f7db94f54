"""Run a script (or `-m module`) as __main__ and write every file it opened to LOG, one path a line.

    python tests/record_opens.py LOG scripts/sft.py --config ...
    python tests/record_opens.py LOG -m trellis.cli run ...

Tests use it to check that bad input stops a stage before it opens any model or data file. The hook
sees Python's opens (open(), os.open(), io): datasets' JSON/CSV readers, transformers' and tokenizers'
config files and Trellis's own reads; files mapped by native code (safetensors, Arrow) are not seen,
so the tests look for the JSON files a model or a dataset is read from first.
"""

import os
import runpy
import subprocess
import sys
from pathlib import Path


def main() -> None:
    log, *command = sys.argv[1:]
    opened: list[str] = []

    def record(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.abspath(os.fsdecode(args[0])))

    sys.addaudithook(record)  # for the rest of this process: it only runs the command
    try:
        if command[0] == "-m":
            sys.argv = [command[1], *command[2:]]
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = command
            sys.path[0] = os.path.dirname(os.path.abspath(command[0]))  # as `python SCRIPT` sets it
            runpy.run_path(command[0], run_name="__main__")
    finally:
        Path(log).write_text("".join(f"{path}\n" for path in list(opened)))


def run_recording_opens(
    command: list[str], cwd: Path, log: Path
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `python record_opens.py LOG *command` in cwd; return the result and the absolute paths it opened."""
    result = subprocess.run(
        [sys.executable, __file__, str(log), *command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )
    return result, log.read_text().splitlines()


if __name__ == "__main__":
    main()
