"""The wire between server and clients: what crosses it, its byte count, and lossy compression.

Every payload is serialised for real (payload.py); the byte count of those bytes is what the
run reports, and the receiver only ever sees the deserialised copy. With ``[compress]`` set,
payloads are quantised on the way (fedfit.quantize: unbiased stochastic uniform quantisation
to b bits, bit-packed, so the count is the packed size):

- upload: of a payload of weights (``payload_kind`` "weights" or "subset") the *update* is
  quantised, ``new - downloaded`` per tensor, and the server rebuilds ``downloaded + update``
  (the update is small and centred, the weights are not: Ro et al. 2022 quantise updates);
  a gradient upload (FedSGD) is quantised as is;
- download: the global tensors are quantised once per round (a broadcast) and every client
  starts from the dequantised copy; the server rebuilds uploads on that same copy, so the
  download's rounding error enters the next global model, unbiased;
- methods whose payloads are seeds and projected-gradient scalars (zero-order) cannot be
  quantised: a replayed scalar must be bit-exact on both sides; asking for it is an error.

The quantisation noise draws from (run seed, round, client), so runs stay reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from fedfit.algorithms.base import ClientTask, Update
from fedfit.config import CompressConfig, ConfigError
from fedfit.engine.seeds import derive_seed
from fedfit.payload import Payload, deserialize, serialize
from fedfit.quantize import decode, encode

OFF = 32
_UPLOAD, _DOWNLOAD = 1, 2  # seed streams


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass
class Channel:
    """Serialises (and, if configured, quantises) downloads and uploads; returns byte counts."""

    compress: CompressConfig
    payload_kind: str
    method: str
    seed: int
    # Downloads are serialised once per distinct payload object per round (a broadcast); the
    # payload itself is kept so that its id cannot be reused by another object meanwhile.
    _downloads: dict[int, tuple[Payload, Payload, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        quantised = self.compress.upload_bits != OFF or self.compress.download_bits != OFF
        if quantised and self.payload_kind == "scalars":
            raise ConfigError(
                f"compress: {self.method} sends seeds and projected-gradient scalars, which "
                "must arrive bit-exact to be replayed; set compress.upload_bits and "
                "compress.download_bits to 32"
            )

    def start_round(self) -> None:
        self._downloads.clear()

    def download(self, task: ClientTask, round_: int) -> tuple[ClientTask, int]:
        """The task as the client receives it, and the download's size in bytes."""
        key = id(task.download)
        if key not in self._downloads:
            bits = self.compress.download_bits
            if bits == OFF:
                sent, size = task.download, len(serialize(task.download))
            else:
                wire = serialize(
                    encode(
                        task.download,
                        bits,
                        self.compress.block,
                        _generator(self.seed, round_, _DOWNLOAD),
                    )
                )
                sent, size = decode(deserialize(wire)), len(wire)
            self._downloads[key] = (task.download, sent, size)
        _, sent, size = self._downloads[key]
        return replace(task, download=sent), size

    def upload(self, update: Update, task: ClientTask) -> int:
        """Send ``update`` through the wire (in place: its payload becomes what the server
        receives); returns the upload's size in bytes."""
        bits = self.compress.upload_bits
        if bits == OFF:
            wire = serialize(update.payload)
            update.payload = deserialize(wire)
            return len(wire)
        generator = _generator(task.seed, _UPLOAD)
        if self.payload_kind == "gradient":
            wire = serialize(encode(update.payload, bits, self.compress.block, generator))
            update.payload = decode(deserialize(wire))
            return len(wire)
        delta = self._delta(update.payload, task.download)
        wire = serialize(encode(delta, bits, self.compress.block, generator))
        received = decode(deserialize(wire))
        update.payload = {n: task.download[n].to(torch.float32) + d for n, d in received.items()}
        return len(wire)

    def _delta(self, payload: Payload, download: Payload) -> Payload:
        missing = [n for n in payload if n not in download]
        if missing:
            raise ValueError(
                f"compress.upload_bits: {self.method} uploads tensors it did not download "
                f"({missing[:3]}), so there is no reference to quantise an update against"
            )
        wrong = [n for n in payload if payload[n].shape != download[n].shape]
        if wrong:
            raise ValueError(
                f"compress.upload_bits: {self.method} uploads {wrong[0]} with shape "
                f"{tuple(payload[wrong[0]].shape)}, downloaded as "
                f"{tuple(download[wrong[0]].shape)}; an update needs equal shapes"
            )
        return {n: t.to(torch.float32) - download[n].to(torch.float32) for n, t in payload.items()}
