"""Locate the official taming-transformers code for side-by-side benchmarks (never committed here).

The location comes from the environment alone: ``TAMING_REFERENCE_SRC``, a checkout (the folder
holding ``taming/``), or ``TAMING_REFERENCE_GIT``, a git directory of
github.com/CompVis/taming-transformers, whose ``taming`` package is then exported into a temporary
folder. Without either, benchmarks report our figures alone and say that the reference was missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def taming_reference() -> Path | None:
    src = os.environ.get("TAMING_REFERENCE_SRC")
    if src and (Path(src) / "taming").is_dir():
        return Path(src)
    git_dir = os.environ.get("TAMING_REFERENCE_GIT")
    if not git_dir or not Path(git_dir).exists():
        print("reference taming code not found: set TAMING_REFERENCE_SRC or TAMING_REFERENCE_GIT")
        return None
    out = Path(tempfile.mkdtemp(prefix="taming-ref-"))
    archive = subprocess.run(["git", "--git-dir", git_dir, "archive", "HEAD", "taming"], capture_output=True)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def import_taming() -> bool:
    """Put the reference on sys.path; True when ``taming`` is importable."""
    ref = taming_reference()
    if ref is None:
        return False
    sys.path.insert(0, str(ref))
    try:
        import taming.modules.diffusionmodules.model  # noqa: F401
        import taming.modules.vqvae.quantize  # noqa: F401
    except ImportError as e:
        print(f"reference taming code found at {ref} but not importable: {e}")
        return False
    return True
