"""Export committed images as files a person or a training script opens: an ImageFolder tree or
WebDataset tar shards.

Any committed image-shard output (``ingest``, an annotating stage, ``sample``), local or ``s3://``:

    python -m pipelines.export .local/runs/demo/samples .local/export/samples
    python -m pipelines.export .local/runs/demo/images .local/export/images-wds --format webdataset
    make export IMAGES=.local/runs/demo/samples DEST=.local/export/samples [FORMAT=webdataset]

- ``imagefolder`` (default): ``<class>/<name>.png``, the layout ``torchvision.datasets.ImageFolder``
  and most training code read. The class folder is the label's name made safe for a path
  (``T-shirt/top`` -> ``T-shirt_top``; ``unlabelled`` for rows without a label); ``<name>`` is
  the sample index (generated sets, zero-padded) or the image id. An output with several splits
  gets one tree per split (``train/<class>/...``, ``test/<class>/...``).
- ``webdataset``: ``<split>-000000.tar``, ... of ``--shard-size`` samples, written with the
  ``webdataset`` library's ``ShardWriter``: per sample ``<key>.png`` (the shard's PNG bytes),
  ``<key>.cls`` (the label id) and ``<key>.json`` (label name, split, image id, source).

The PNG bytes are the shards' own (no re-encoding). The files are written beside the destination
and appear there only when complete (locally one rename; on S3 the files, then ``export.json``
last), with ``export.json`` recording the source, its stage identity and the counts per split and
class, which are checked against the manifest (and a generated set's label counts) first. An
existing destination is left alone: the same export again is a no-op, anything else an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from infra import image_shards, schemas, stage, storage

log = logging.getLogger(__name__)
FORMATS = ("imagefolder", "webdataset")
MARKER = "export.json"


def safe_name(name: str) -> str:
    """A class name as one path component: letters, digits, ``-``, ``_``, ``.`` and spaces kept,
    anything else (``/``, ``\\``, ``:``...) one ``_``; never empty, ``.`` or ``..``."""
    s = re.sub(r"[^\w.\- ]+", "_", name).strip(" .")
    return s or "_"


def class_dirs(label_names: list[str] | None, labels: set[int | None]) -> dict[int | None, str]:
    """Label id -> its folder: the safe name (the id appended where two names collide), the id
    itself without names, ``unlabelled`` for None."""
    out: dict[int | None, str] = {}
    used: Counter[str] = Counter()
    named = {lab: safe_name(label_names[lab]) for lab in labels if lab is not None and label_names}
    used.update(named.values())
    for lab in sorted(labels, key=lambda v: (v is None, v if v is not None else 0)):
        if lab is None:
            out[lab] = "unlabelled"
        elif lab in named:
            out[lab] = named[lab] if used[named[lab]] == 1 else f"{named[lab]}_{lab}"
        else:
            out[lab] = str(lab)
    return out


def _source(images_uri: str, split: str | None):
    m = stage.read_manifest(images_uri)  # NotCommittedError names an unfinished output
    d = image_shards.describe(m)  # InputError for outputs that are not images
    files = m.data_files(split)
    if not files:
        have = sorted({f.split for f in m.data_files()})
        raise stage.InputError(f"export: {images_uri} has no split {split!r} (it has {have})")
    m.check_sizes()
    return m, d, files


def _done(dest_uri: str, m: stage.Manifest, fmt: str, split: str | None) -> dict[str, Any] | None:
    """The record of an identical earlier export at ``dest_uri``; None when there is nothing there;
    an error for anything else there."""
    marker = storage.join(dest_uri, MARKER)
    if storage.exists(marker):
        done = storage.read_json(marker)
        if (done.get("identity"), done.get("format"), done.get("split")) == (m.identity, fmt, split):
            return done
    if storage.exists(dest_uri):
        raise stage.InputError(
            f"export: {dest_uri} exists and is not this export of {m.output_uri}; choose another "
            "destination or remove it"
        )
    return None


def export(
    images_uri: str,
    dest_uri: str,
    fmt: str = "imagefolder",
    split: str | None = None,
    shard_size: int = 1000,
) -> dict[str, Any]:
    """Write the committed images at ``images_uri`` to ``dest_uri`` as ``fmt``; returns the record
    written as ``export.json`` (counts per split and class)."""
    if fmt not in FORMATS:
        raise ValueError(f"export: format must be one of {FORMATS}, not {fmt!r}")
    if shard_size < 1:
        raise ValueError("export: shard_size must be >= 1")
    m, d, files = _source(images_uri, split)
    if (done := _done(dest_uri, m, fmt, split)) is not None:
        log.info("export: %s already holds this export (%d images)", dest_uri, done["images"])
        return done
    remote = storage.is_remote(dest_uri)
    local_dest = None if remote else Path(storage.filesystem(dest_uri)[1])
    parent = None if remote else local_dest.parent
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=parent))
    try:
        counts = _write(m, d, files, tmp, fmt, shard_size)
        record = _check(m, d, files, counts, images_uri, fmt, split)
        (tmp / MARKER).write_text(json.dumps(record, indent=1, sort_keys=True))
        if remote:
            fs, path = storage.filesystem(dest_uri)
            for f in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MARKER):
                fs.put_file(str(f), f"{path}/{f.relative_to(tmp).as_posix()}")
            fs.put_file(str(tmp / MARKER), f"{path}/{MARKER}")  # last: the export is complete
        else:
            os.replace(tmp, local_dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("export: %d images of %s -> %s (%s)", record["images"], images_uri, dest_uri, fmt)
    return record


def _rows(m: stage.Manifest, files, generated: bool):
    columns = ["image_id", "image", "label", "split", "source_uri"] + (["sample_index"] if generated else [])
    for f in files:
        t = stage.read_file(storage.join(m.output_uri, f.path), f, columns)
        yield t, schemas.image_bytes(t["image"])


def _write(m, d, files, root: Path, fmt: str, shard_size: int) -> Counter:
    """The files under ``root``; (split, label) -> images written."""
    generated = isinstance(d, image_shards.GeneratedImageShards)
    splits = sorted({f.split for f in files})
    counts: Counter = Counter()
    writers: dict[str, Any] = {}
    # a folder per recorded class name (made unique over all of them), the id for unnamed labels
    named = class_dirs(d.label_names, set(range(len(d.label_names or []))) | {None})
    try:
        for t, pngs in _rows(m, files, generated):
            ids, labs, sps = t["image_id"].to_pylist(), t["label"].to_pylist(), t["split"].to_pylist()
            srcs = t["source_uri"].to_pylist()
            idx = t["sample_index"].to_pylist() if generated else [None] * len(ids)
            for iid, lab, sp, src, i, png in zip(ids, labs, sps, srcs, idx, pngs):
                key = f"{i:06d}" if i is not None else iid
                counts[(sp, lab)] += 1
                if fmt == "imagefolder":
                    name = named.get(lab, str(lab))
                    folder = root / sp / name if len(splits) > 1 else root / name
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"{key}.png").write_bytes(png)
                    continue
                if sp not in writers:
                    import webdataset as wds

                    writers[sp] = wds.ShardWriter(
                        str(root / f"{sp}-%06d.tar"), maxcount=shard_size, verbose=0
                    )
                meta = {"label": lab, "split": sp, "image_id": iid, "source_uri": src}
                if lab is not None and d.label_names:
                    meta["label_name"] = d.label_names[lab]
                sample = {"__key__": key, "png": png, "json": meta}
                if lab is not None:
                    sample["cls"] = lab
                writers[sp].write(sample)
    finally:
        for w in writers.values():
            w.close()
    return counts


def _check(m, d, files, counts: Counter, images_uri: str, fmt: str, split: str | None) -> dict[str, Any]:
    """Counts against the manifest (and a generated set's label counts); the export's record."""
    total = sum(counts.values())
    want = sum(f.rows for f in files)
    if total != want:
        raise stage.InputError(f"export: wrote {total} images, the manifest of {images_uri} lists {want}")
    per_split: dict[str, dict[str, int]] = {}
    for (sp, lab), n in sorted(counts.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        per_split.setdefault(sp, {})[str(lab)] = n
    for sp in per_split:
        listed = sum(f.rows for f in files if f.split == sp)
        if sum(per_split[sp].values()) != listed:
            raise stage.InputError(
                f"export: split {sp}: {sum(per_split[sp].values())} images, manifest {listed}"
            )
    g = getattr(d, "generation", None)
    if g is not None and g.label_counts and split is None:
        got = {str(lab): n for (_, lab), n in counts.items() if lab is not None}
        if got != {k: v for k, v in g.label_counts.items() if v}:
            raise stage.InputError(
                f"export: label counts {got} differ from the generation's {g.label_counts}"
            )
    return {
        "source_uri": images_uri,
        "identity": m.identity,  # the committed output (its stage identity)
        "format": fmt,
        "split": split,
        "images": total,
        "counts": per_split,
        "label_names": d.label_names,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.export",
        description=__doc__.split("\n\n")[0],
        epilog="Reading the shards without exporting: see the README (pandas, datasets).",
    )
    p.add_argument("images_uri", help="a committed image-shard output: ingest, an annotating stage, sample")
    p.add_argument("dest_uri", help="where the files go (local or s3://); must not exist yet")
    p.add_argument("--format", choices=FORMATS, default="imagefolder", help="default: %(default)s")
    p.add_argument("--split", default=None, help="only this split (train, val, test); default: all")
    p.add_argument(
        "--shard-size", type=int, default=1000, help="webdataset: samples per tar (default: %(default)s)"
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        record = export(a.images_uri, a.dest_uri, a.format, a.split, a.shard_size)
    except (stage.InputError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({k: record[k] for k in ("images", "counts")}, indent=1))
    print(f"-> {a.dest_uri}")
    return record


if __name__ == "__main__":
    main()
