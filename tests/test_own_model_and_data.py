"""Bring your own model and data: local checkpoints and local files through the CLI, offline.

A tiny random BERT and a tiny random Llama are saved with save_pretrained (with the zoo's
tokenizers) to temporary folders; a small CSV (classification) and JSONL (causal LM) are
written next to them; ``fedfit run`` trains 2 rounds of fedavg and lora on each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedfit.cli import main
from fedfit.engine.runfolder import RunFolder
from fedfit.models import get_model_info, load_model
from fedfit.models.checkpoints import LocalModelError, inspect_checkpoint

WORDS = "good bad fine great awful nice poor calm loud bright dark sweet".split()


def save_tiny(kind: str, folder: Path) -> Path:
    """A zoo tiny model (random weights) and its tokenizer, saved as a user would."""
    name, task = ("tiny-bert", "classification") if kind == "bert" else ("tiny-llama", "lm")
    model, tokenizer = load_model(name, task, num_labels=2, seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(folder: Path) -> tuple[Path, Path]:
    rows = []
    for i in range(96):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 5)]
        rows.append((" ".join(words), "pos" if i % 3 else "neg"))
    csv = folder / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    jsonl = folder / "lines.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in rows))
    return csv, jsonl


def run_cli(tmp_path: Path, model: Path, data: Path, method: str, lm: bool) -> dict:
    name = f"{model.name}-{data.stem}-{method}"
    args = [
        "run",
        "--set", f"model.name={json.dumps(str(model))}",
        "--set", f"data.path={json.dumps(str(data))}",
        "--set", f"data.task={'lm' if lm else 'classification'}",
        "--set", "data.partition=iid",
        "--set", "data.num_clients=4",
        "--set", "data.clients_per_round=2",
        "--set", "data.min_examples=5",
        "--set", "data.eval_examples=0",
        "--set", f"method.name={method}",
        "--set", "run.rounds=2",
        "--set", "run.eval_every=1",
        "--set", "train.local_steps=2",
        "--set", "train.batch_size=4",
        "--set", f"run.output_dir={json.dumps(str(tmp_path / 'runs'))}",
        "--set", f"run.name={name}",
    ]  # fmt: skip
    assert main(args) == 0
    return RunFolder(tmp_path / "runs" / name).summary()


@pytest.mark.parametrize("method", ["fedavg", "lora"])
def test_local_checkpoints_and_files_train_through_the_cli(
    tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bert = save_tiny("bert", tmp_path / "my-bert")
    llama = save_tiny("llama", tmp_path / "my-llama")
    csv, jsonl = write_data(tmp_path)
    for model, data, lm in ((bert, csv, False), (llama, jsonl, True), (llama, csv, False)):
        summary = run_cli(tmp_path, model, data, method, lm)
        final = summary["final"]
        if lm:
            # random weights over a 49k vocabulary: perplexity near the vocabulary size
            assert 1e3 < final["perplexity"] < 2e5
        else:
            assert 0.0 <= final["accuracy"] <= 1.0
        assert summary["per_client"]["upload_bytes_mean"] > 0
    capsys.readouterr()


def test_local_checkpoint_info_is_exact(tmp_path: Path) -> None:
    folder = save_tiny("llama", tmp_path / "m")
    model, _ = load_model("tiny-llama", "lm", seed=3)
    info = get_model_info(str(folder))
    assert info.family == "llama" and info.tasks == ("lm", "classification")
    assert info.num_params == sum(p.numel() for p in model.model.parameters())
    loaded, _ = load_model(str(folder), "lm", seed=0)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n  # the saved weights, not a random init


def test_models_inspect_prints_layers_params_and_methods(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    folder = save_tiny("bert", tmp_path / "b")
    assert main(["models", "--inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    info = get_model_info(str(folder))
    assert "bert" in out and f"{info.num_params:,}" in out and "lora" in out


def test_bad_checkpoint_folders_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(LocalModelError, match="does not exist"):
        inspect_checkpoint(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LocalModelError, match="no config.json"):
        inspect_checkpoint(str(empty))
    folder = save_tiny("bert", tmp_path / "b")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(LocalModelError, match="model_type 'gpt2' is not supported"):
        inspect_checkpoint(str(folder))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").rename(folder / "weights.bak")
    with pytest.raises(LocalModelError, match="no weights"):
        inspect_checkpoint(str(folder))
    (folder / "weights.bak").rename(folder / "model.safetensors")
    for f in ("tokenizer.json", "vocab.txt"):
        (folder / f).unlink(missing_ok=True)
    with pytest.raises(LocalModelError, match="no tokenizer"):
        inspect_checkpoint(str(folder))
    # the CLI reports it as an error (exit 2) before anything trains
    assert main(["run", "--set", f"model.name={json.dumps(str(folder))}"]) == 2
