"""GSM8K (Cobbe et al. 2021) through `tensorflow_datasets` without TensorFlow.

tensorflow-datasets 4.9.x has no GSM8K builder, so `Gsm8k` is one: a
`GeneratorBasedBuilder` that reads the official JSONL files (`{"question", "answer"}` per
line, answers ending in "#### <number>") and writes them in array_record format, which
`tfds.data_source` then reads by random access, TensorFlow never being imported.  Each
record keeps its line number ("index"), since TFDS shuffles records when writing.

The files come from the download manager: `train.jsonl` and `test.jsonl` placed in the
manual directory (`tfds.download.DownloadConfig(manual_dir=...)`, or the default
`<data_dir>/downloads/manual`) are used as they are; without them the official files are
downloaded from `GSM8K_URLS`.

`GSM8KEnv` is a single-turn env over these rows: think, then `<answer>N</answer>`, scored
by the numeric matcher against the number after "####".
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from grpo_jax.envs.base import Row, SingleTurnEnv
from grpo_jax.rubrics.numbers import extract_gsm8k_answer
from grpo_jax.rubrics.parsers import XMLParser, think_answer_parser
from grpo_jax.rubrics.rewards import correct_answer, format_reward
from grpo_jax.rubrics.rubric import Rubric

_SOURCE = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
GSM8K_URLS = {"train": f"{_SOURCE}/train.jsonl", "test": f"{_SOURCE}/test.jsonl"}


class _Gsm8kBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """GSM8K grade-school math word problems: question and worked solution ending "#### N"."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official train (7473) and test (1319) JSONL files."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Optional: put the official train.jsonl and test.jsonl in the manual "
                                    "directory to build without downloading.")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 finds a builder's source through `importlib_resources`, a package it
        # does not depend on; the source of this builder is simply this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Grade-school math word problems with worked solutions (GSM8K).",
            features=tfds.features.FeaturesDict({"question": tfds.features.Text(),
                                                 "answer": tfds.features.Text(),
                                                 "index": tfds.features.Scalar(np.int64)}),
            homepage="https://github.com/openai/grade-school-math",
            citation="Cobbe et al. 2021, Training Verifiers to Solve Math Word Problems, arXiv:2110.14168",
        )

    def _split_generators(self, dl_manager):
        paths = None
        try:
            manual = dl_manager.manual_dir
            if all((manual / f"{split}.jsonl").exists() for split in GSM8K_URLS):
                paths = {split: manual / f"{split}.jsonl" for split in GSM8K_URLS}
        except AssertionError:  # no (or an empty) manual directory
            pass
        if paths is None:
            paths = dl_manager.download(GSM8K_URLS)
        return {split: self._generate_examples(path) for split, path in paths.items()}

    def _generate_examples(self, path):
        with open(path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                if line.strip():
                    record = json.loads(line)
                    yield index, {"question": record["question"], "answer": record["answer"], "index": index}


# Registered as "gsm8k" for `tfds.data_source("gsm8k", ...)`, unless tfds has its own.
try:
    class Gsm8k(_Gsm8kBuilder):
        __doc__ = _Gsm8kBuilder.__doc__
except ValueError:  # a later tfds release registered "gsm8k" itself
    class Gsm8k(_Gsm8kBuilder, skip_registration=True):
        __doc__ = _Gsm8kBuilder.__doc__


def prepare_gsm8k(data_dir: str, manual_dir: str | None = None) -> Gsm8k:
    """Build GSM8K into `data_dir` in array_record format (a no-op when already built)."""
    builder = Gsm8k(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def gsm8k_source(split: str, data_dir: str, manual_dir: str | None = None):
    """The random-access data source of a split (records with bytes "question" / "answer")."""
    builder = prepare_gsm8k(data_dir, manual_dir)
    try:
        registered = tfds.builder_cls("gsm8k") is Gsm8k
    except Exception:  # tfds raises its own not-found error types
        registered = False
    if registered:
        return tfds.data_source("gsm8k", split=split, data_dir=data_dir, download=False)
    return builder.as_data_source(split=split)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_gsm8k_rows(split: str, data_dir: str, manual_dir: str | None = None, n: int | None = None,
                    seed: int = 0) -> list[dict[str, Any]]:
    """Rows {"question", "answer" (the final number), "info": {"solution", "index"}, "task": "gsm8k"}.

    All rows in the official files' order ("index": line number) when `n` is None, else `n`
    rows in a `seed`-determined order (TFDS stores records shuffled; order is restored here).
    """
    source = gsm8k_source(split, data_dir, manual_dir)
    records = [source[i] for i in range(len(source))]
    records.sort(key=lambda record: int(record["index"]))
    if n is not None:
        records = [records[i] for i in np.random.default_rng(seed).permutation(len(records))[:n]]
    rows = []
    for record in records:
        solution = _text(record["answer"])
        rows.append({"question": _text(record["question"]), "answer": extract_gsm8k_answer(solution),
                     "info": {"solution": solution, "index": int(record["index"])}, "task": "gsm8k"})
    return rows


GSM8K_SYSTEM_PROMPT = ("Solve the problem. Think step by step inside <think></think>, then give the final "
                       "number inside <answer></answer>.")


class GSM8KEnv(SingleTurnEnv):
    """Single-turn GSM8K: correct_answer (1.0, numeric match) + strict_format (0.2)."""
    name = "gsm8k"

    def __init__(self, data_dir: str, *, manual_dir: str | None = None, parser: XMLParser | None = None,
                 system_prompt: str | None = GSM8K_SYSTEM_PROMPT, **kwargs):
        self.data_dir, self.manual_dir = data_dir, manual_dir
        parser = parser or think_answer_parser()
        kwargs.setdefault("rubric", Rubric([correct_answer(parser), format_reward(parser)], [1.0, 0.2],
                                           parser=parser))
        super().__init__(parser=parser, system_prompt=system_prompt, **kwargs)

    def dataset(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
        return [self._with_task(r) for r in load_gsm8k_rows(split, self.data_dir, self.manual_dir, n, seed)]

    def gold_completion(self, row: Row) -> list[dict[str, str]]:
        """The reference solution as the thinking (calculator annotations <<...>> removed)."""
        reasoning = re.sub(r"<<[^<>]*>>", "", row["info"]["solution"].rsplit("####", 1)[0]).strip()
        values = {"answer": row["answer"]}
        if "think" in self.parser.fields:
            values["think"] = reasoning
        return [{"role": "assistant", "content": self.parser.format(**values)}]
