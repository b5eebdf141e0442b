"""Task formulations: how examples become batches, and how a batch is scored for accuracy.

* classification — the head's argmax (images or text);
* causal-lm — "<review> Sentiment: <label>", trained on the label token, scored by comparing the model's
  next-token logits of the label words after "Sentiment:" (not free generation);
* seq2seq — "sentiment: <review>" → "<label>", scored by the decoder's first-step logits of the label words.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .data import Split


class Formulation:
    task = ""

    def collate(self, inputs: torch.Tensor | list[str], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens processed by one step on this batch (pixels count as one 'token' per example)."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else len(batch["labels"])


class ImageClassification(Formulation):
    task = "classification"

    def collate(self, inputs, labels):
        return {"pixel_values": inputs, "labels": labels}

    def predict(self, model, batch):
        return model(pixel_values=batch["pixel_values"]).logits.argmax(-1)


class _Text(Formulation):
    def __init__(self, tokenizer, max_length: int, label_words: tuple[str, ...]) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.label_words = label_words
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # First token of " negative" / " positive": a leading space is a word boundary for BPE, ignored by WordPiece.
        self.label_ids = torch.tensor([tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in label_words])
        if len(set(self.label_ids.tolist())) != len(label_words):
            raise ValueError(f"label words {label_words} do not start with distinct tokens")


class TextClassification(_Text):
    task = "classification"

    def collate(self, inputs, labels):
        enc = self.tok(list(inputs), truncation=True, max_length=self.max_length, padding="max_length",
                       return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}

    def predict(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)


class CausalLMSentiment(_Text):
    """Right-padded "<review> Sentiment: <label word>"; the loss is on the label token only."""

    task = "causal-lm"

    def collate(self, inputs, labels):
        prompts = self.tok([f"{t} Sentiment:" for t in inputs], add_special_tokens=False, truncation=True,
                           max_length=self.max_length - 1).input_ids
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.full_like(ids, -100)
        for i, (p, y) in enumerate(zip(prompts, labels.tolist())):
            n = len(p)
            ids[i, :n] = torch.tensor(p, dtype=torch.long)
            ids[i, n] = self.label_ids[y]
            mask[i, : n + 1] = 1
            target[i, n] = self.label_ids[y]
        return {"input_ids": ids, "attention_mask": mask, "labels": target, "class_labels": labels}

    def predict(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        offset = logits.shape[1] - batch["input_ids"].shape[1]  # prompt-learning methods prepend virtual tokens
        last = batch["attention_mask"].sum(1) - 2  # position that predicts the label token
        scores = logits[torch.arange(len(last)), last + offset][:, self.label_ids]
        return scores.argmax(-1)


class Seq2SeqSentiment(_Text):
    task = "seq2seq"

    def collate(self, inputs, labels):
        enc = self.tok([f"sentiment: {t}" for t in inputs], truncation=True, max_length=self.max_length,
                       padding="max_length", return_tensors="pt")
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        target = torch.stack([self.label_ids[labels], torch.full_like(labels, eos)], dim=1)
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": target,
                "class_labels": labels}

    def predict(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.logits[:, 0, self.label_ids].argmax(-1)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without bookkeeping keys (what the model's forward takes)."""
    return {k: v for k, v in batch.items() if k != "class_labels"}


def batches(split: Split, form: Formulation, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[dict]:
    """One pass over `split` in batches; the order depends only on `seed`."""
    n = len(split)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield form.collate(split.subset(idx.numpy()).inputs, split.labels[idx])


def endless(split: Split, form: Formulation, batch_size: int, seed: int) -> Iterator[dict]:
    """Full batches forever, reshuffled each epoch (epoch e uses seed + e)."""
    epoch = 0
    while True:
        for b in batches(split, form, batch_size, seed + epoch):
            if len(b["labels"]) == batch_size:
                yield b
        epoch += 1


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, form: Formulation, batch_size: int) -> float:
    """Share of `split` the model labels correctly (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    correct = 0
    for b in batches(split, form, batch_size, seed=0, shuffle=False):
        truth = b.get("class_labels", b["labels"])
        correct += int((form.predict(model, b) == truth).sum())
    model.train(was_training)
    return correct / len(split)
