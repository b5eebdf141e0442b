"""Serving probes (the `serve` mode of a cell; suite `inference`): a trained adapter as it is served.

After the training budget, in the cell's process:

* **generation** — greedy decoding with the KV cache of real test reviews cut to exactly P prompt tokens, D new
  tokens, per (P, batch) in `SHAPES`: time to first token (the prefill forward and its argmax), the median decode
  step, tokens/s and the KV cache's bytes (beside a closed form from the model's configuration) — for the base model
  (adapter disabled), the trained adapter unmerged, and merged where the method can merge, interleaved so that all
  three see the same state of the machine. Merged must generate the tokens unmerged generates (else the first
  divergence and the logit gap there are reported). The loop is our own (`greedy`): prefix tuning's cache and prompt
  tuning's embeddings are put in front as peft's forward does in training; `transformers.generate` on the same
  model is a second witness of the tokens (`generate_agrees`).
* **adapters** (peft LoRA, `hf-lora`): 1, 8 and 32 adapters loaded over one base — bytes per adapter (tensors,
  against r·(in+out) per target from the configuration; the process's RSS growth), decode latency with that many
  loaded, a batch whose rows use different adapters (peft's `adapter_names=`) against the same rows run adapter by
  adapter (the tokens and the prefill logits must agree), `set_adapter` and peft's in-place hot-swap.
* **fidelity** — unmerged against merged per dtype (float32, bfloat16, float16): the largest logit difference on
  the prompt and how many greedy tokens agree before the first divergence.

Each measurement is one row of `serving.csv` (`peft_bench.measure.records.ServingRecord`); a repeat of the cell is
another process with the same rows, and the report puts the intervals over processes on them (`measure.stats`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import tempfile
import time

import torch
from torch import nn

from ..measure.records import ServingRecord
from .setup import on_device

SHAPES = ((128, 1), (512, 1), (128, 8))  # (prompt tokens, batch): short and long prompt at batch 1, a batch of 8
NEW_TOKENS = 16
ADAPTERS = (1, 8, 32)
FIDELITY_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class Generated:
    tokens: torch.Tensor  # (batch, new tokens)
    ttft_s: float
    decode_s: list[float]
    cache_bytes: int
    first_logits: torch.Tensor  # logits of the last prompt position (batch, vocab)
    step_logits: list[torch.Tensor]
    prompt_logits: torch.Tensor | None = None  # every prompt position's (keep_logits)


# -- the greedy loop ------------------------------------------------------------------------------------------------
def _peft_prompt(model: nn.Module):
    """The active peft config of a prompt-learning model (prefix, prompt, P-tuning), else None."""
    cfg = getattr(model, "active_peft_config", None)
    return cfg if cfg is not None and getattr(cfg, "is_prompt_learning", False) else None


def prefill_inputs(model: nn.Module, ids: torch.Tensor, extra: dict | None = None) -> tuple[nn.Module, dict, int]:
    """(the module to call, its prefill inputs, virtual tokens in front): what peft's forward does in training."""
    cfg, mask = _peft_prompt(model), torch.ones_like(ids)
    if cfg is None:
        return model, {"input_ids": ids, "attention_mask": mask, **(extra or {})}, 0
    from peft import PeftType

    n, b = cfg.num_virtual_tokens, ids.shape[0]
    full_mask = torch.cat([torch.ones(b, n, dtype=mask.dtype, device=ids.device), mask], dim=1)
    base = model.get_base_model()
    if cfg.peft_type == PeftType.PREFIX_TUNING:
        return base, {"input_ids": ids, "attention_mask": full_mask, "past_key_values": model.get_prompt(b)}, n
    embeds = model.word_embeddings(ids)
    prompts = model.get_prompt(batch_size=b).to(embeds.dtype)
    return base, {"inputs_embeds": torch.cat([prompts, embeds], dim=1), "attention_mask": full_mask}, n


def cache_bytes(cache) -> int:
    """Bytes of a transformers cache's key and value tensors (every layer)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # legacy tuple of (key, value) per layer
        return sum(t.numel() * t.element_size() for kv in cache for t in kv)
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)


@torch.inference_mode()
def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int, extra: dict | None = None,
           keep_logits: bool = False) -> Generated:
    """Greedy decoding with the KV cache: one prefill forward, then one forward per new token."""
    core, inputs, _ = prefill_inputs(model, ids, extra)
    t0 = time.perf_counter()
    out = core(**inputs, use_cache=True)
    last = out.logits[:, -1].float()
    prompt_logits = out.logits.float() if keep_logits else None
    nxt = last.argmax(-1)
    ttft, mask = time.perf_counter() - t0, inputs["attention_mask"]
    tokens, steps, kept = [nxt], [], []
    cache = out.past_key_values
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        t = time.perf_counter()
        out = core(input_ids=nxt[:, None], attention_mask=mask, past_key_values=cache, use_cache=True,
                   **(extra or {}))
        logits = out.logits[:, -1].float()
        nxt = logits.argmax(-1)
        steps.append(time.perf_counter() - t)
        cache = out.past_key_values
        tokens.append(nxt)
        if keep_logits:
            kept.append(logits)
    return Generated(torch.stack(tokens, 1), ttft, steps, cache_bytes(cache), last, kept, prompt_logits)


def kv_closed_form(config, batch: int, positions: int, element_bytes: int) -> int:
    """2 (key, value) × layers × key/value heads × head size × batch × positions × element size, from the config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.num_layers
    heads = getattr(cfg, "num_attention_heads", None) or cfg.num_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * layers * kv_heads * head_dim * batch * positions * element_bytes


def fitted(s, prompt: int) -> int:
    """`prompt`, or less where the model's positions cannot hold it with the virtual and new tokens."""
    from ..arch import describe

    limit = describe(s.model).position_limit
    cfg = _peft_prompt(s.model)
    room = limit - NEW_TOKENS - (cfg.num_virtual_tokens if cfg else 0) if limit else prompt
    return min(prompt, room)


def prompt_ids(s, prompt: int, batch: int) -> torch.Tensor:
    """`batch` rows of exactly `prompt` tokens (fewer where the model's positions end first, `fitted`): the test
    reviews' tokens in order, one stretch per row."""
    prompt = fitted(s, prompt)
    tok, need, flat = s.form.tok, prompt * batch, []
    for text in s.data.test.inputs:
        flat += tok(str(text), add_special_tokens=False).input_ids
        if len(flat) >= need:
            break
    if len(flat) < need:
        flat = (flat * (need // max(1, len(flat)) + 1))[:need]
    return on_device({"x": torch.tensor(flat[:need]).view(batch, prompt)}, s.spec)["x"]


# -- generation: base / unmerged / merged ---------------------------------------------------------------------------
@contextlib.contextmanager
def variant(s, name: str):
    """The model as `name`: the adapter disabled (base), as trained (unmerged), or merged into the base."""
    if name == "base" and _peft_prompt(s.model) is not None:  # prompt learning leaves the base untouched
        yield s.model.get_base_model()
    elif name == "base":
        with s.method.disabled(s.model):
            yield s.model
    elif name == "merged":
        s.method.merge(s.model)
        try:
            yield s.model
        finally:
            s.method.unmerge(s.model)
    else:
        yield s.model


def variants(s) -> tuple[str, ...]:
    names = () if s.method.trains_everything else ("base",)
    return (*names, "unmerged", *(("merged",) if s.method.can_merge else ()))


def generation_rows(s, witness: bool = True) -> list[dict]:
    """Every (prompt, batch) shape for every variant, the variants interleaved; merged checked against unmerged; the
    first shape's tokens witnessed by recomputing without the cache and by transformers' generate."""
    s.model.eval()
    rows = []
    for i, (prompt, batch) in enumerate(SHAPES):
        ids = prompt_ids(s, prompt, batch)
        prompt = ids.shape[1]
        got = {}
        for name in variants(s):
            with variant(s, name) as model:
                got[name] = greedy(model, ids, NEW_TOKENS, keep_logits=name == "unmerged")
        witness = _witnesses(s.model, ids, got["unmerged"].tokens) if i == 0 and witness else {}
        for name, g in got.items():
            rows.append(_generation_row(s, name, (prompt, batch), g, got["unmerged"], witness))
    return rows


def _generation_row(s, name: str, shape: tuple[int, int], g: Generated, unmerged: Generated,
                    witness: dict) -> dict:
    prompt, batch = shape
    n = 0 if name == "base" else (lambda c: c.num_virtual_tokens if c else 0)(_peft_prompt(s.model))
    element = next(s.model.parameters()).element_size()
    decode = statistics.median(g.decode_s) if g.decode_s else math.nan
    rec = ServingRecord(
        probe="generation", variant=name, prompt_tokens=prompt, batch=batch, new_tokens=NEW_TOKENS,
        virtual_tokens=n, ttft_s=g.ttft_s, decode_token_s=decode,
        tokens_per_s=batch * NEW_TOKENS / (g.ttft_s + sum(g.decode_s)),
        kv_cache_bytes=g.cache_bytes,
        kv_cache_closed_form_bytes=kv_closed_form(_config(s.model), batch, n + prompt + NEW_TOKENS - 1, element),
        **(witness if name == "unmerged" else {}))
    if name == "merged":
        rec = dataclasses.replace(rec, **_agreement(g, unmerged))
    return dataclasses.asdict(rec)


def _config(model: nn.Module):
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


def _agreement(g: Generated, ref: Generated) -> dict:
    """Tokens equal to the reference's, or where they first differ and the reference's logit gap there."""
    same = (g.tokens == ref.tokens).all(0)
    if bool(same.all()):
        return {"tokens_equal": True, "first_divergence": -1, "logit_gap": math.nan}
    k = int((~same).nonzero()[0])
    row = int((g.tokens[:, k] != ref.tokens[:, k]).nonzero()[0])
    logits = ref.first_logits if k == 0 else ref.step_logits[k - 1]
    gap = float(logits[row, ref.tokens[row, k]] - logits[row, g.tokens[row, k]])
    return {"tokens_equal": False, "first_divergence": k, "logit_gap": gap}


WITNESSED_TOKENS = 8


def _witnesses(model: nn.Module, ids: torch.Tensor, tokens: torch.Tensor) -> dict:
    """The cached loop's first tokens against (1) the model's own forward over the whole sequence, recomputed for
    every token without a cache — the path training used — and (2) transformers' greedy `generate`."""
    k = min(WITNESSED_TOKENS, tokens.shape[1])
    with torch.inference_mode():
        seq = ids
        for _ in range(k):
            nxt = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    want = tokens[:, :k].cpu()
    note = ""
    try:
        with torch.inference_mode():
            config = copy.deepcopy(model.generation_config)
            config.eos_token_id, config.pad_token_id = None, _config(model).eos_token_id or 0
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                 do_sample=False, num_beams=1, generation_config=config)
        agrees = bool(torch.equal(out[:, -k:].cpu(), want))
    except Exception as e:  # peft's generate path for prompt learning, under this transformers: seen raising
        agrees, note = False, f"generate raised {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return {"no_cache_agrees": bool(torch.equal(seq[:, -k:].cpu(), want)), "generate_agrees": agrees,
            "witness_note": note}


# -- many adapters over one base (peft LoRA) ------------------------------------------------------------------------
ADAPTER_SHAPE = (128, 8)  # the mixed batch: 8 rows, each its own adapter


def _adapter_bytes(model: nn.Module, name: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if f".{name}." in n)


def add_adapters(model: nn.Module, count: int, start: int) -> list[str]:
    """Adapters `a{start}`… up to `count` in all, each with its own random (non-zero) weights, the trained one's
    config otherwise."""
    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = False  # B random too: every adapter changes the output differently
    names = []
    for i in range(start, count):
        torch.manual_seed(1000 + i)
        model.add_adapter(f"a{i}", config)
        names.append(f"a{i}")
    return names


def adapter_rows(s) -> list[dict]:
    """1, 8, 32 adapters loaded: bytes each, decode latency with that many held; then the mixed batch and the
    switches with 32 held."""
    import psutil

    model, rows, loaded = s.model, [], 1
    model.eval()
    closed = s.method.closed_form_trainable(model) * next(model.parameters()).element_size()
    ids = prompt_ids(s, *ADAPTER_SHAPE)
    for count in ADAPTERS:
        rss = psutil.Process().memory_info().rss
        add_adapters(model, count, loaded)
        grown = psutil.Process().memory_info().rss - rss
        model.set_adapter("default")
        g = greedy(model, ids, NEW_TOKENS)
        rows.append(dataclasses.asdict(ServingRecord(
            probe="adapters", variant="unmerged", prompt_tokens=ADAPTER_SHAPE[0], batch=ADAPTER_SHAPE[1],
            new_tokens=NEW_TOKENS, adapters_loaded=count, ttft_s=g.ttft_s,
            decode_token_s=statistics.median(g.decode_s), adapter_bytes=_adapter_bytes(model, "default"),
            adapter_closed_form_bytes=closed,
            rss_per_adapter_bytes=grown / (count - loaded) if count > loaded else math.nan)))
        loaded = count
    return rows + mixed_rows(model, ids) + switch_rows(model, ids)


def mixed_rows(model: nn.Module, ids: torch.Tensor) -> list[dict]:
    """Row i under adapter i: one batch with peft's `adapter_names=` against each row alone under `set_adapter`;
    the tokens must be equal and the prompt logits within rounding."""
    names = ["default"] + [f"a{i}" for i in range(1, ids.shape[0])]
    t = time.perf_counter()
    mixed = greedy(model, ids, NEW_TOKENS, extra={"adapter_names": names})
    mixed_s = time.perf_counter() - t
    alone, t = [], time.perf_counter()
    for i, name in enumerate(names):
        model.set_adapter(name)
        alone.append(greedy(model, ids[i:i + 1], NEW_TOKENS))
    alone_s = time.perf_counter() - t
    model.set_adapter("default")
    tokens = torch.cat([g.tokens for g in alone])
    diff = float((torch.cat([g.first_logits for g in alone]) - mixed.first_logits).abs().max())
    shape = dict(probe="mixed", prompt_tokens=ids.shape[1], batch=ids.shape[0], new_tokens=NEW_TOKENS,
                 adapters_loaded=ADAPTERS[-1])
    return [dataclasses.asdict(ServingRecord(variant="mixed batch", seconds=mixed_s, ttft_s=mixed.ttft_s,
                                             decode_token_s=statistics.median(mixed.decode_s),
                                             tokens_equal=bool(torch.equal(mixed.tokens, tokens)),
                                             max_abs_diff=diff, **shape)),
            dataclasses.asdict(ServingRecord(variant="adapter by adapter", seconds=alone_s, **shape))]


def switch_rows(model: nn.Module, ids: torch.Tensor, times: int = 21) -> list[dict]:
    """`set_adapter` between two held adapters (median of `times`), and peft's hot-swap of the active adapter's
    weights in place from a saved adapter (median of 3), checked: the swapped model gives the saved adapter's
    logits."""
    from peft.utils.hotswap import hotswap_adapter

    took = []
    for i in range(times):
        t = time.perf_counter()
        model.set_adapter("a1" if i % 2 else "default")
        took.append(time.perf_counter() - t)
    model.set_adapter("a1")
    with torch.inference_mode():
        want = model(input_ids=ids[:1]).logits[:, -1].float()
    swaps = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["a1"])
        model.set_adapter("default")
        for _ in range(3):
            t = time.perf_counter()
            hotswap_adapter(model, f"{tmp}/a1", adapter_name="default")
            swaps.append(time.perf_counter() - t)
    with torch.inference_mode():
        got = model(input_ids=ids[:1]).logits[:, -1].float()
    common = dict(probe="switch", adapters_loaded=ADAPTERS[-1])
    return [dataclasses.asdict(ServingRecord(variant="set_adapter", seconds=statistics.median(took), **common)),
            dataclasses.asdict(ServingRecord(variant="hot-swap from disk", seconds=statistics.median(swaps),
                                             max_abs_diff=float((got - want).abs().max()), **common))]


# -- merge fidelity per dtype ---------------------------------------------------------------------------------------
def fidelity_rows(s) -> list[dict]:
    """A copy of the trained model per dtype: unmerged against merged, on the first shape's prompt."""
    if not s.method.can_merge:
        return []
    ids, rows = prompt_ids(s, *SHAPES[0]), []
    for name in FIDELITY_DTYPES:
        dtype = getattr(torch, name)
        # Copied together: the method's own references (modules, its merged flag) then point into the copy.
        method, model = copy.deepcopy((s.method, s.model))
        model = model.to(dtype).eval()
        unmerged = greedy(model, ids, NEW_TOKENS, keep_logits=True)
        method.merge(model)
        merged = greedy(model, ids, NEW_TOKENS, keep_logits=True)
        agree = _agreement(merged, unmerged)
        k = agree["first_divergence"]
        rows.append(dataclasses.asdict(ServingRecord(
            probe="fidelity", variant="merged", dtype=name, prompt_tokens=ids.shape[1], batch=ids.shape[0],
            new_tokens=NEW_TOKENS, max_abs_diff=float((merged.prompt_logits - unmerged.prompt_logits).abs().max()),
            agree_tokens=NEW_TOKENS if k < 0 else k, **agree)))
        del method, model
    return rows


def serving_rows(s, exact: bool = True) -> list[dict]:
    """Everything the serving probe measures in this process, one dict per serving.csv row; `exact`: also the
    witnesses of the tokens and the merge fidelity, which do not vary between processes (the first repeat)."""
    rows = generation_rows(s, witness=exact)
    if s.method.name == "hf-lora":
        rows += adapter_rows(s)
    return rows + (fidelity_rows(s) if exact else [])
