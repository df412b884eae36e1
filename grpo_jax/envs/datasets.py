"""Datasets from a config block: JSONL files, Hugging Face `datasets`, TFDS (no TensorFlow).

    dataset_fn = dataset_from_config({"type": "jsonl", "train": "train.jsonl", "test": "test.jsonl"})
    rows = dataset_fn("train", n=100, seed=0)      # what `Environment(dataset_fn=...)` takes

A spec is a mapping with "type" and the source's fields:
  jsonl  "train", "test": paths of JSONL files (one JSON object a line; a split without a path
         is an error when asked for).
  hf     "path" (a hub name or local directory, as `datasets.load_dataset` takes it), optional
         "name" (configuration), "data_dir", "split" (overrides the asked split; a
         {split: hf split} mapping renames them, e.g. {"test": "validation"}).  Imported on use;
         `pip install datasets` when missing.
  tfds   "name" (a TFDS dataset name, e.g. "mnist" or "gsm8k" once `grpo_jax.envs.gsm8k` is
         imported), "data_dir" (where it is prepared), optional "split" as for hf.  Read by
         random access through `tfds.data_source`, TensorFlow never imported; nothing is
         downloaded (`download=False`), so prepare it first.
Every type also takes a field mapping, the record's key of each row field:
  "question" (default "question"), "answer" (default "answer"), "prompt" (default none: a
  list of messages used instead of the question), "info" (default none: a list of keys copied
  into the row's "info" dict).
Rows are {"question" | "prompt", "answer" (str), "info" (dict, with "index": the record's
position)}. `n` rows are drawn in a `seed`-determined order; all rows in file order when `n` is
None.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np

DATASET_TYPES = ("jsonl", "hf", "tfds")
_FIELDS = ("question", "answer", "prompt", "info")
_KEYS = {"jsonl": ("train", "test"), "hf": ("path", "name", "data_dir", "split"),
         "tfds": ("name", "data_dir", "split")}

DatasetFn = Callable[[str, "int | None", int], list]


def check_spec(spec: Mapping[str, Any]) -> None:
    """`ValueError` naming the key for a spec that cannot be read (before anything is loaded)."""
    kind = spec.get("type")
    if kind not in DATASET_TYPES:
        raise ValueError(f"type: {kind!r} is not one of {DATASET_TYPES}")
    unknown = set(spec) - {"type", *_FIELDS, *_KEYS[kind]}
    if unknown:
        raise ValueError(f"{sorted(unknown)}: not keys of a {kind} dataset "
                         f"(it takes {', '.join(('type',) + _KEYS[kind] + _FIELDS)})")
    required = {"jsonl": ("train",), "hf": ("path",), "tfds": ("name",)}[kind]
    for key in required:
        if not spec.get(key):
            raise ValueError(f"{key}: a {kind} dataset needs it")
    if spec.get("info") is not None and isinstance(spec["info"], str):
        raise ValueError("info: a list of record keys, not a string")


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def to_row(record: Mapping[str, Any], spec: Mapping[str, Any], index: int) -> dict[str, Any]:
    """One row from one record through the spec's field mapping."""
    row: dict[str, Any] = {}
    prompt_key = spec.get("prompt")
    if prompt_key:
        row["prompt"] = [{"role": m["role"], "content": _text(m["content"])} for m in record[prompt_key]]
    else:
        key = spec.get("question") or "question"
        if key not in record:
            raise KeyError(f"record {index} has no question field {key!r} (keys: {sorted(record)}); "
                           "set the dataset's 'question' (or 'prompt') mapping")
        row["question"] = _text(record[key])
    answer_key = spec.get("answer") or "answer"
    row["answer"] = _text(record[answer_key]) if answer_key in record else None
    row["info"] = {"index": index, **{k: record[k] for k in (spec.get("info") or ())}}
    return row


def _split_name(spec: Mapping[str, Any], split: str) -> str:
    chosen = spec.get("split")
    if isinstance(chosen, Mapping):
        return chosen.get(split, split)
    return chosen or split


def _pick(count: int, n: int | None, seed: int) -> Sequence[int]:
    if n is None:
        return range(count)
    return np.random.default_rng(seed).permutation(count)[:n].tolist()


def _jsonl_records(spec, split: str) -> list[dict[str, Any]]:
    path = spec.get(split)
    if not path:
        raise ValueError(f"the jsonl dataset has no {split!r} file (set its {split!r} path)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hf_records(spec, split: str):
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as e:
        raise ImportError("an 'hf' dataset needs the Hugging Face `datasets` package: "
                          "pip install datasets") from e
    return datasets.load_dataset(spec["path"], spec.get("name"), data_dir=spec.get("data_dir"),
                                 split=_split_name(spec, split))


def _tfds_records(spec, split: str):
    import tensorflow_datasets as tfds  # no TensorFlow: data_source reads array_record files
    return tfds.data_source(spec["name"], split=_split_name(spec, split), data_dir=spec.get("data_dir"),
                            download=False)


_READERS = {"jsonl": _jsonl_records, "hf": _hf_records, "tfds": _tfds_records}


def load_rows(spec: Mapping[str, Any], split: str = "train", n: int | None = None,
              seed: int = 0) -> list[dict[str, Any]]:
    """Rows of `split` from the source `spec` (see the module docstring)."""
    check_spec(spec)
    records = _READERS[spec["type"]](spec, split)
    return [to_row(records[i], spec, i) for i in _pick(len(records), n, seed)]


def dataset_from_config(spec: Mapping[str, Any]) -> DatasetFn:
    """`(split, n, seed) -> rows` of the source `spec`, checked now, read on use."""
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    check_spec(spec)
    return lambda split, n=None, seed=0: load_rows(spec, split, n, seed)
