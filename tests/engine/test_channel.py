"""The wire: byte counts, quantised uploads (update = new - downloaded) and downloads."""

from __future__ import annotations

import json

import pytest
import torch

from fedfit.algorithms.base import ClientTask, Update
from fedfit.config import load_config
from fedfit.engine.channel import Channel
from fedfit.engine.experiment import run
from fedfit.errors import ConfigError
from fedfit.payload import payload_bytes, serialize
from fedfit.quantize import CompressConfig, encode


def make(upload: int = 32, download: int = 32, block: int = 0, kind: str = "weights") -> Channel:
    return Channel(CompressConfig(upload, download, block), kind, "fedavg", seed=0)


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(64, 32, generator=g), "a.bias": torch.randn(32, generator=g)}


def test_uncompressed_wire_is_the_serialised_payload() -> None:
    down = weights()
    channel = make()
    task, size = channel.download(ClientTask(0, 1, 5, down), 1)
    assert size == payload_bytes(down) and task.download is down
    new = {n: t + 0.5 for n, t in down.items()}
    update = Update(0, dict(new), 10)
    assert channel.upload(update, task) == payload_bytes(new)
    assert all(torch.equal(update.payload[n], new[n]) for n in new)


@pytest.mark.parametrize("bits,block", [(8, 0), (4, 0), (2, 64)])
def test_quantised_upload_sends_the_update_and_rebuilds_the_weights(bits: int, block: int) -> None:
    down = weights()
    g = torch.Generator().manual_seed(1)
    new = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in down.items()}
    channel = make(upload=bits, block=block)
    task, _ = channel.download(ClientTask(0, 1, 5, down), 1)
    update = Update(0, dict(new), 10)
    size = channel.upload(update, task)
    delta = {n: new[n] - down[n] for n in new}
    # the byte count is the packed update's, not the float32 weights'
    assert size == len(serialize(encode(delta, bits, block, torch.Generator().manual_seed(0))))
    metadata_bits = 64 / block if block else 0  # lo and step in fp32 per block
    assert size < payload_bytes(new) * ((bits + metadata_bits) / 32 + 0.1)
    for n, d in delta.items():
        flat = d.flatten()
        blocks = flat.split(block) if block else [flat]
        step = max(float(b.max() - b.min()) for b in blocks) / (2**bits - 1)
        err = (update.payload[n] - new[n]).abs().max().item()
        assert 0 < err <= step * 1.0001 + 1e-6, (n, err, step)  # lossy, within one step
    # the same client seed gives the same rounding; another seed other rounding
    again = Update(0, dict(new), 10)
    channel.upload(again, task)
    other = Update(0, dict(new), 10)
    channel.upload(other, ClientTask(0, 1, 6, task.download))
    assert all(torch.equal(again.payload[n], update.payload[n]) for n in new)
    assert any(not torch.equal(other.payload[n], update.payload[n]) for n in new)


def test_quantised_download_is_one_broadcast_per_round() -> None:
    down = weights()
    channel = make(download=8)
    a, size_a = channel.download(ClientTask(0, 1, 5, down), 1)
    b, size_b = channel.download(ClientTask(1, 1, 9, down), 1)
    assert size_a == size_b < payload_bytes(down) * 0.35  # 1/4 + headers of small tensors
    for n, t in down.items():
        assert torch.equal(a.download[n], b.download[n])  # the same broadcast copy
        step = float(t.max() - t.min()) / 255
        assert (a.download[n] - t).abs().max() <= step * 1.0001
    # the upload is rebuilt on the copy the client started from
    channel_up = make(upload=8, download=8)
    task, _ = channel_up.download(ClientTask(0, 1, 5, down), 1)
    update = Update(0, {n: t.clone() for n, t in task.download.items()}, 10)
    channel_up.upload(update, task)  # an unchanged model: update 0, rebuilt exactly
    assert all(torch.equal(update.payload[n], task.download[n]) for n in down)


def test_bad_compression_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="compress.upload_bits"):
        load_config(None, ["compress.upload_bits=12"])
    with pytest.raises(ConfigError, match="seeds and projected-gradient scalars"):
        make(upload=8, kind="scalars")
    channel = make(upload=8)
    task = ClientTask(0, 1, 5, {"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="did not download"):
        channel.upload(Update(0, {"y": torch.ones(3)}, 1), task)


def test_engine_reports_packed_upload_bytes(tmp_path) -> None:
    def upload(bits: int) -> tuple[int, float]:
        config = load_config(
            None,
            [
                "model.name=tiny-bert",
                "method.name=fedavg",
                "data.num_clients=6",
                "data.clients_per_round=2",
                "data.eval_examples=32",
                "run.rounds=1",
                "train.local_steps=1",
                "train.batch_size=4",
                f"compress.upload_bits={bits}",
                f"run.output_dir={json.dumps(str(tmp_path))}",
                f"run.name=b{bits}",
            ],
        )
        run_dir = run(config)
        rows = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
        return rows[-1]["upload_bytes"], rows[-1]["download_bytes"]  # round 1 (0: the start)

    full, down = upload(32)
    four, down4 = upload(4)
    assert down4 == down  # downloads are not quantised here
    assert four / full == pytest.approx(4 / 32, abs=0.01)
