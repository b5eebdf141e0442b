"""Task formulations: how examples become batches, and how a batch is scored for accuracy.

* classification — the head's argmax (images or text);
* causal-lm — "<review> Sentiment: <label>", trained on the label token, scored by comparing the model's
  next-token logits of the label words after "Sentiment:" (not free generation);
* seq2seq — "sentiment: <review>" → "<label>", scored by the decoder's first-step logits of the label words.

A prompt longer than `max_length` loses the end of its review, never the template around it: the causal-LM
prompt always ends in " Sentiment:" followed by the label token, the seq2seq one always starts with "sentiment:"
and keeps the tokenizer's special tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
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

    def prompts(self, texts, prefix: str, suffix: str, room: int) -> list[list[int]]:
        """Token ids of prefix + review + suffix, each at most `room` long: only the review is cut (at its end)."""
        head = self.tok(prefix, add_special_tokens=False).input_ids if prefix else []
        tail = self.tok(suffix, add_special_tokens=False).input_ids if suffix else []
        keep = room - len(head) - len(tail)
        if keep < 1:
            raise ValueError(f"max_length {self.max_length} leaves no room for a review in the prompt template")
        reviews = self.tok([str(t).strip() for t in texts], add_special_tokens=False).input_ids
        return [head + r[:keep] + tail for r in reviews]

    def lengths(self, texts) -> list[int]:
        """Tokens each example takes formatted in full (template, special tokens and label included), uncut."""
        raise NotImplementedError

    def _template(self, prefix: str, suffix: str) -> int:
        return sum(len(self.tok(t, add_special_tokens=False).input_ids) for t in (prefix, suffix) if t)

    def _reviews(self, texts) -> list[int]:
        return [len(r) for r in self.tok([str(t).strip() for t in texts], add_special_tokens=False).input_ids]

    def special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after one sequence ([CLS] … [SEP] for BERT, … </s> for T5)."""
        plain = self.tok("a", add_special_tokens=False).input_ids
        full = self.tok("a").input_ids
        at = next(i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain)
        return full[:at], full[at + len(plain):]


class TextClassification(_Text):
    task = "classification"

    def lengths(self, texts):
        return [len(ids) for ids in self.tok([str(t) for t in texts]).input_ids]

    def collate(self, inputs, labels):
        enc = self.tok(list(inputs), truncation=True, max_length=self.max_length, padding="max_length",
                       return_tensors="pt")
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}

    def predict(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)


class CausalLMSentiment(_Text):
    """Right-padded "<review> Sentiment: <label word>"; the loss is on the label token only."""

    task = "causal-lm"

    SUFFIX = " Sentiment:"

    def lengths(self, texts):
        fixed = self._template("", self.SUFFIX) + 1  # the label token
        return [n + fixed for n in self._reviews(texts)]

    def collate(self, inputs, labels):
        prompts = self.prompts(inputs, "", self.SUFFIX, self.max_length - 1)  # one position left for the label
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
        scores = logits[torch.arange(len(last), device=last.device), last + offset][:, self.label_ids.to(logits.device)]
        return scores.argmax(-1)


    @torch.no_grad()
    def general_loss(self, model: nn.Module, texts, batch_size: int) -> tuple[float, int]:
        """Mean next-token loss (nats) over `texts` (each cut to max_length tokens) and the number of tokens
        predicted: the language-modelling ability the sentiment training may have worn away."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(texts), batch_size):
            rows = [r[: self.max_length] for r in
                    self.tok([str(t) for t in texts[start : start + batch_size]], add_special_tokens=False).input_ids]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            logits = logits[:, logits.shape[1] - width :]  # prompt-learning methods prepend virtual tokens
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                       target.reshape(-1), ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
        model.train(was_training)
        return total / max(count, 1), count


class Seq2SeqSentiment(_Text):
    task = "seq2seq"

    PREFIX = "sentiment:"  # the review, tokenized on its own, starts at a word boundary

    def lengths(self, texts):
        fixed = self._template(self.PREFIX, "") + sum(map(len, self.special_tokens()))
        return [n + fixed for n in self._reviews(texts)]

    def collate(self, inputs, labels):
        before, after = self.special_tokens()
        prompts = [before + p + after
                   for p in self.prompts(inputs, self.PREFIX, "", self.max_length - len(before) - len(after))]
        enc = self.tok.pad({"input_ids": prompts}, padding="max_length", max_length=self.max_length,
                           return_tensors="pt")
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        target = torch.stack([self.label_ids[labels], torch.full_like(labels, eos)], dim=1)
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": target,
                "class_labels": labels}

    def predict(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.logits[:, 0, self.label_ids.to(out.logits.device)].argmax(-1)


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
    if len(split) < batch_size:  # no full batch: the loop below would never yield
        from ..errors import UserError

        raise UserError(f"the split has {len(split)} examples, fewer than one batch of {batch_size}; "
                        "use a smaller --batch-size or more data")
    epoch = 0
    while True:
        for b in batches(split, form, batch_size, seed + epoch):
            if len(b["labels"]) == batch_size:
                yield b
        epoch += 1


def by_length(split: Split) -> Split:
    """The split longest text first (images unchanged): evaluation batches then carry little padding."""
    if torch.is_tensor(split.inputs):
        return split
    order = sorted(range(len(split)), key=lambda i: -len(split.inputs[i]))
    return split.subset(np.asarray(order, dtype=np.int64))


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the padding columns that no row of a right-padded batch uses (outputs at real tokens unchanged)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return batch
    used = int(mask.sum(1).max())
    width = mask.shape[1]
    return {k: v[:, :used] if v.dim() == 2 and v.shape[1] == width and k != "class_labels" else v
            for k, v in batch.items()}


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, form: Formulation, batch_size: int) -> float:
    """Share of `split` the model labels correctly (eval mode, no dropout; batches by length, padding trimmed)."""
    was_training = model.training
    model.eval()
    correct = sum(int((pred == truth).sum()) for pred, truth in predictions(model, split, form, batch_size))
    model.train(was_training)
    return correct / len(split)


def predictions(model: nn.Module, split: Split, form: Formulation, batch_size: int) -> Iterator[tuple]:
    """(predicted labels, true labels) per evaluation batch, both on the model's device: every tensor of a batch is
    moved to the device of the model's parameters before the forward (text is tokenized on the CPU per batch)."""
    device = next(model.parameters()).device
    for b in batches(by_length(split), form, batch_size, seed=0, shuffle=False):
        b = {k: v.to(device) for k, v in trim(b).items()}
        yield form.predict(model, b), b.get("class_labels", b["labels"])
