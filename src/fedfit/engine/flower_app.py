"""The Flower App components of a fedfit deployment (``flwr run``; see engine/executors/flower.py).

pyproject.toml written by ``fedfit flower app`` names ``fedfit.engine.flower_app:serverapp``
and ``:clientapp``. Flower 1.41 starts a fresh process for every message a SuperNode gets,
so this module imports only Flower: a node answers the ServerApp's QUERY (which fedfit
client's data it holds) without loading torch or the model; a TRAIN message loads
engine/executors/flower.py and, through it, fedfit's client side. With
``server.secure_aggregation = "secaggplus"`` the train handler runs inside Flower's
``secaggplus_mod`` (``flower_context.secure_aggregation_mod``, which reads the run config):
the mod answers the protocol's key-exchange and unmasking stages alone, without loading
torch either.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported

from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedfit.engine.flower_context import (  # noqa: E402
    answer_query,
    run_config_text,
    secure_aggregation_mod,
)

clientapp = ClientApp()


@clientapp.query()
def query(message: Message, context: Context) -> Message:
    return answer_query(message, context)


@clientapp.train(mods=[secure_aggregation_mod()])
def train(message: Message, context: Context) -> Message:
    from fedfit.engine.executors.flower import train_client

    return train_client(message, context, run_config_text(context))


serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    from fedfit.engine.executors.flower import serve_deployment

    serve_deployment(grid, context)
