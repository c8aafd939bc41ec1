"""Access to the parity fixtures (numbers from the official implementations), never copied here.

Found through ``$TAMING_FIXTURES`` or ``../shared/fixtures`` beside the repo. Where neither exists
(a user's clone) parity tests skip with the reason; under CI (``CI=true``) a missing fixture fails.
Gzipped weight files are decompressed into a temporary folder that keeps the release layout.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def fixtures_root() -> Path:
    env = os.environ.get("TAMING_FIXTURES")
    return Path(env) if env else ROOT.parent / "shared" / "fixtures"


def require(rel: str) -> Path:
    path = fixtures_root() / rel
    if path.exists() or Path(f"{path}.gz").exists():
        return path
    msg = f"parity fixture {path} not found (set TAMING_FIXTURES or place shared/fixtures beside the repo)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


def release_copy(rel: str, dest: Path) -> Path:
    """A copy of a release folder under ``dest`` with every ``*.gz`` decompressed in place."""
    src = require(rel)
    out = dest / rel.replace("/", "_")
    if out.exists():
        return out
    for f in src.rglob("*"):
        if f.is_dir():
            continue
        target = out / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".gz":
            with gzip.open(f, "rb") as fin, open(target.with_suffix(""), "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(f, target)
    return out


def expected(rel: str) -> dict:
    return torch.load(require(rel) / "expected.pt", map_location="cpu", weights_only=True)
