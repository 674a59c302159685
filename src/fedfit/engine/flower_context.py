"""What a Flower node knows of its fedfit run: the partition it holds and the run's config.

Imports only Flower: a deployed node answers the ServerApp's QUERY with it without loading
torch (engine/flower_app.py); the executor (engine/executors/flower.py) uses it too.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402

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
            "`fedfit flower app CONFIG --dir DIR` (fedfit.engine.executors.flower.write_app)"
        )
    return text
