"""What a Flower node knows of its fedfit run: the partition it holds and the run's config.

Imports only Flower: a deployed node answers the ServerApp's QUERY with it without loading
torch (engine/flower_app.py), and runs the key-exchange stages of secure aggregation
(``secure_aggregation_mod``) the same way; the executor (engine/executors/flower.py) and
secure aggregation's server side (engine/flower_secagg.py) use it too, and share its waits.
"""

from __future__ import annotations

import os
import tomllib

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp.typing import ClientAppCallable, Mod  # noqa: E402

CONFIG_KEY = "fedfit-config"  # the run config key holding the fedfit config (TOML text)
# How long the ServerApp waits for the nodes of every client: a node's first answer comes
# after its process has imported torch and fedfit and built its setup, which took over 120 s
# on this project's 2-core machine while other runs shared it.
NODE_WAIT_S = 300.0
REPLY_TIMEOUT_S = 3600.0  # per round (under SecAgg+, per stage of the protocol)


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


def secure_aggregation(config_text: str) -> str:
    """The ``server.secure_aggregation`` of a fedfit config (TOML text), read with tomllib
    alone: a deployed node's key-exchange stages do not load fedfit's config (or torch)."""
    server = tomllib.loads(config_text).get("server", {})
    return str(server.get("secure_aggregation", "none"))


def secure_aggregation_mod(config_text: str | None = None) -> Mod:
    """The train mod of fedfit's ClientApp: Flower's ``secaggplus_mod`` when the run's fedfit
    config (``config_text``, or when None the run config's, as in a deployment) asks for
    SecAgg+, else the handler directly. Under it, the mod answers the protocol's stages
    itself and calls the train handler only for the stage that uploads the masked vector; a
    TRAIN message outside the protocol is refused. The node decides from the run's config,
    not from what a message says, so a server cannot have it upload in the clear."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if message.metadata.message_type != MessageType.TRAIN:
            return call_next(message, context)
        text = config_text if config_text is not None else run_config_text(context)
        if secure_aggregation(text) == "secaggplus":
            from flwr.client.mod import secaggplus_mod

            return secaggplus_mod(message, context, call_next)
        return call_next(message, context)

    return mod
