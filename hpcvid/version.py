"""The version of the code that ran, recorded with everything hpcvid writes (records, checkpoints,
predictions, reports, benchmarks) so that a number can be traced to the code that made it."""
from __future__ import annotations

from pathlib import Path


def code_version() -> str:
    """hpcvid's version plus the git commit of the checkout it runs from (``0.3.0+gabc1234``, with
    ``.dirty`` when tracked files have uncommitted changes); the bare version outside a git checkout."""
    from hpcvid import __version__
    from hpcvid.errors import CommandError
    from hpcvid.launch.external import run_command

    here = str(Path(__file__).resolve().parent)
    try:
        commit = run_command(["git", "-C", here, "rev-parse", "--short", "HEAD"], timeout=5).stdout.strip()
        dirty = run_command(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                            timeout=5).stdout.strip()
    except CommandError:
        return __version__
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}" if commit else __version__
