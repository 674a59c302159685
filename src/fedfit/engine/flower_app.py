"""The Flower App components of a fedfit deployment (``flwr run``; see engine/flower.py).

pyproject.toml written by ``fedfit flower app`` names ``fedfit.engine.flower_app:serverapp``
and ``:clientapp``. Flower 1.41 starts a fresh process for every message a SuperNode gets,
so this module imports only Flower: a node answers the ServerApp's QUERY (which fedfit
client's data it holds) without loading torch or the model; a TRAIN message loads
engine/flower.py and, through it, fedfit's client side.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

CONFIG_KEY = "fedfit-config"  # the run config key holding the fedfit config (TOML text)


def node_partition(context: Context) -> int | None:
    """The fedfit client whose data this node holds: its ``partition-id`` node config
    (``flower-supernode --node-config 'partition-id=K'``; the simulation sets it)."""
    value = context.node_config.get("partition-id")
    return None if value is None else int(value)  # type: ignore[arg-type]


def answer_query(message: Message, context: Context) -> Message:
    """The reply to the ServerApp's QUERY: this node's partition (-1 when it has none)."""
    partition = node_partition(context)
    record = ConfigRecord({"partition-id": -1 if partition is None else partition})
    return Message(RecordDict({"node": record}), reply_to=message)


def run_config_text(context: Context) -> str:
    """The fedfit config (TOML text) the app's run config carries."""
    text = context.run_config.get(CONFIG_KEY)
    if not isinstance(text, str):
        raise ValueError(
            f"flower: the run config has no {CONFIG_KEY!r}; write the app with "
            "`fedfit flower app CONFIG --dir DIR` (fedfit.engine.flower.write_app)"
        )
    return text


clientapp = ClientApp()


@clientapp.query()
def query(message: Message, context: Context) -> Message:
    return answer_query(message, context)


@clientapp.train()
def train(message: Message, context: Context) -> Message:
    from fedfit.engine.flower import train_client

    return train_client(message, context, run_config_text(context))


serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    from fedfit.engine.flower import serve_deployment

    serve_deployment(grid, context)
