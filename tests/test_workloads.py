"""Loaders (shapes, balance, determinism), batching, evaluation, and the hub path with local files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_bench import UserError, get_method
from peft_bench.errors import UnsupportedError
from peft_bench.workloads import data as D
from peft_bench.workloads import get_workload, hub_workload, list_workloads, resolve
from peft_bench.workloads.tasks import accuracy, batches, endless, model_inputs

TINY = ["mlp-mnist-tiny", "minilm-sentiment-tiny", "gpt-neo-tiny", "t5-tiny"]


def test_registry_lists_embedded_and_tiny_workloads():
    assert set(list_workloads()) == {"mlp-mnist", "minilm-sentiment", "gpt-neo-125m-arch", "t5-small-arch",
                                     "smollm2-135m-sentiment", *TINY}
    assert get_workload("minilm-sentiment").pretrained and not get_workload("gpt-neo-125m-arch").pretrained
    with pytest.raises(UserError, match="unknown workload 'x'; choose one of: mlp-mnist"):
        get_workload("x")


def test_mnist_5k_is_real_stratified_normalised_and_deterministic():
    a, b = D.mnist_5k(0), D.mnist_5k(0)
    assert a.train.inputs.shape == (4000, 784) and a.test.inputs.shape == (1000, 784)
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.labels, b.test.labels)
    assert torch.bincount(a.test.labels).tolist() == [100] * 10  # 500 per class, 20 % held out
    # The tutorial's Normalize((0.1307,), (0.3081,)): background pixels map to -0.1307/0.3081.
    assert torch.isclose(a.train.inputs.min(), torch.tensor(-0.1307 / 0.3081), atol=1e-6)
    assert not torch.equal(D.mnist_5k(1).test.labels, a.test.labels)


def test_rotten_tomatoes_drops_plot_rows_and_keeps_balance():
    d = D.rotten_tomatoes(0)
    assert len(d.train) + len(d.test) == 7403 + 5405
    for split in (d.train, d.test):
        assert abs(float(split.labels.float().mean()) - 7403 / 12808) < 0.002
    assert d.label_names == ("negative", "positive")
    assert D.rotten_tomatoes(0).test.inputs[:5] == d.test.inputs[:5]


@pytest.mark.parametrize("name", TINY)
def test_tiny_workload_batches_are_deterministic_and_sized(name):
    w = get_workload(name)
    data, form = w.data(0), w.formulation()
    b1 = next(endless(data.train, form, w.batch_size, 7))
    b2 = next(endless(w.data(0).train, w.formulation(), w.batch_size, 7))
    for k in b1:
        assert torch.equal(b1[k], b2[k])
    if w.max_length:
        assert b1["input_ids"].shape == (w.batch_size, w.max_length)  # truncated and padded to max length
    n = sum(len(b["labels"]) for b in batches(data.test, form, 5, 0, shuffle=False))
    assert n == len(data.test)


def test_causal_lm_batch_puts_the_label_token_last_and_masks_the_rest():
    w = get_workload("gpt-neo-tiny")
    form = w.formulation()
    b = form.collate(["a fine film"] * 2 + ["x " * 200], torch.tensor([1, 0, 1]))
    assert b["input_ids"].shape == (3, w.max_length)  # the long review is cut (its end, not the template)
    for i, y in enumerate([1, 0, 1]):
        last = int(b["attention_mask"][i].sum()) - 1
        assert b["input_ids"][i, last] == form.label_ids[y]
        assert (b["labels"][i] != -100).sum() == 1 and b["labels"][i, last] == form.label_ids[y]


@pytest.mark.parametrize("name", TINY)
def test_each_tiny_workload_trains_one_step_under_each_supporting_method(name):
    from peft_bench.methods import list_methods, method_class

    w = get_workload(name)
    data, form = w.data(0), w.formulation()
    batch = model_inputs(next(endless(data.train, form, w.batch_size, 0)))
    for m in list_methods():
        if method_class(m).unsupported_reason(w.family):
            continue
        method = get_method(m)
        try:
            model = method.apply(w.build_model())
        except UnsupportedError:  # refused on this model, with its reason (bitfit without biases, ...)
            continue
        model(**batch).loss.backward()
        torch.optim.AdamW(method.trainable_parameters(model).values()).step()
        acc = accuracy(model, data.test.subset(np.arange(20)), form, 10)
        assert 0.0 <= acc <= 1.0


# -- the hub path, with local files --------------------------------------------------------------------
@pytest.fixture
def local_model(tmp_path):
    from peft_bench import models

    model = models.gpt_neo("tiny")
    model.save_pretrained(tmp_path / "model")
    tok = get_workload("gpt-neo-tiny").load_tokenizer()
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def local_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [f'"review number {i} was {"great" if i % 2 else "awful"}",{i % 2}' for i in range(40)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def test_local_model_directory_and_csv_dataset_go_through_the_hub_code(local_model, local_csv):
    w = hub_workload(str(local_model), str(local_csv), max_length=24, batch_size=4)
    assert w.task == "causal-lm" and w.family == "decoder"
    data, form = w.data(0), w.formulation()
    assert len(data.train) == 32 and len(data.test) == 8
    model = get_method("lora").apply(w.build_model())
    out = model(**model_inputs(next(endless(data.train, form, 4, 0))))
    assert torch.isfinite(out.loss)


def test_only_safetensors_are_loaded_unless_pickle_is_allowed(local_model):
    (local_model / "model.safetensors").rename(local_model / "moved.safetensors")
    w = hub_workload(str(local_model))
    with pytest.raises(UserError, match="only safetensors are loaded; pass --allow-pickle"):
        w.build_model()


def test_a_model_folder_without_weights_is_refused_when_named(local_model):
    for f in local_model.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match="has a config but no weights"):
        hub_workload(str(local_model))


def test_a_dataset_with_one_label_is_refused_before_the_run(local_model, tmp_path):
    from peft_bench.config import RunConfig
    from peft_bench.engine.plan import plan, validate_data

    data = tmp_path / "one.csv"
    data.write_text("text,label\n" + "".join(f"review number {i},1\n" for i in range(40)))
    cfg = RunConfig(model=str(local_model), dataset=str(data), methods=("lora",), suite="custom")
    with pytest.raises(UserError, match="every training example has the label 1"):
        validate_data(plan(cfg), cfg)


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 4])
def test_an_empty_or_binary_local_file_is_named_as_unreadable_not_as_the_hub(tmp_path, content):
    from peft_bench.workloads.data import hub_dataset

    path = tmp_path / "data.csv"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        hub_dataset(str(path), 0)
    assert "Hub" not in str(e.value) and str(path) in str(e.value)


def test_unreachable_hub_id_fails_in_one_line_naming_the_embedded_workload(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        resolve(model="EleutherAI/gpt-neo-125m")
    msg = str(e.value)
    assert "\n" not in msg and "cannot be reached" in msg and "gpt-neo-125m-arch" in msg


def test_unreachable_hub_dataset_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load dataset 'stanfordnlp/imdb'.*embedded Rotten Tomatoes"):
        D.hub_dataset("stanfordnlp/imdb", 0)


def test_dataset_without_text_and_label_columns_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("review,stars\nnice,5\n")
    with pytest.raises(UserError, match="needs columns 'text' and 'label'"):
        D.hub_dataset(str(bad), 0)
