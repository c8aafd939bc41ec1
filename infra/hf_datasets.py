"""Committed image and code shards as Hugging Face ``datasets``, as they are.

Every data file carries its ``datasets`` features (the Image feature in ``image``, a ClassLabel with
the class names in ``label``) and is named for its split, so ``datasets`` reads an output folder
directly; :func:`load` reads exactly the files a committed output's manifest lists (never an
unfinished attempt's), local or on S3:

    from infra import hf_datasets
    ds = hf_datasets.load(".local/runs/demo/images")  # DatasetDict: train, test (and validation)
    ds["train"][0]["image"]                           # a PIL image
    ds["train"].features["label"].names               # the class names
    samples = hf_datasets.load(".local/runs/demo/samples", split="train")

Without the helper, ``datasets.load_dataset("parquet", data_dir=<output>)`` gives the same splits;
``pandas.read_parquet(<output>)`` and ``pyarrow.parquet.read_table(<output>)`` the committed rows.
"""

from __future__ import annotations

from typing import Any

from infra import stage

# our split names -> the ones datasets uses
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


def data_files(uri: str) -> dict[str, list[str]]:
    """The data files of a committed output by ``datasets`` split name (``val`` -> ``validation``)."""
    m = stage.read_manifest(uri)
    if m.dataset is None:
        raise stage.InputError(f"{uri} is a committed {m.stage} output, not a dataset")
    out: dict[str, list[str]] = {}
    for f, u in zip(m.files, m.data_uris()):
        out.setdefault(SPLIT_NAMES.get(f.split or "train", f.split or "train"), []).append(u)
    return out


def load(uri: str, split: str | None = None, **kwargs: Any):
    """The committed output at ``uri`` as a ``datasets.DatasetDict`` (or the ``Dataset`` of
    ``split``); ``kwargs`` go to ``datasets.load_dataset`` (``cache_dir``, ``streaming``, ...)."""
    import datasets

    return datasets.load_dataset("parquet", data_files=data_files(uri), split=split, **kwargs)
