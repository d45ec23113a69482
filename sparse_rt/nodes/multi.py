"""`sparse-rt run --edges N`: one server process and N edge processes over tcp:// on loopback.

Every process is a real `sparse-rt node`; each edge trains its own head on
its own shard of the training data (as N devices would hold N parts), all
against the server's one shared tail, then evaluates on the whole test set.
"""
from __future__ import annotations

import time
from typing import Any

from sparse_rt.config import RunConfig
from sparse_rt.nodes.launch import NodeProcess


def run_edges(config: RunConfig, edges: int, echo: bool = True) -> dict[str, Any]:
    """Train with ``edges`` edge processes; returns per-edge summaries, totals and the server's counts."""
    started = time.perf_counter()
    shared = {"pipeline": config.pipeline, "seed": config.seed, "resolution": config.resolution, "lr": config.lr,
              "json": True}
    server = NodeProcess("server", {**shared, "bind": "tcp://127.0.0.1:*"}, echo="server" if echo else None)
    nodes = []
    try:
        address = server.wait_ready()
        nodes = [NodeProcess("edge", {**shared, "connect": address, "shard": f"{k}/{edges}", "budget": config.budget,
                                      "epochs": config.epochs, "codec": config.codec, "lz4": config.lz4,
                                      "data": config.data, "batch_size": config.batch_size},
                             echo=f"edge {k}" if echo else None)
                 for k in range(1, edges + 1)]
        results = [node.result() for node in nodes]
    finally:
        for node in nodes:
            if node.process.poll() is None:
                node.process.kill()
        server.stop()
    server_summary = server.result(timeout=60)
    total = {key: sum(result[key] for result in results)
             for key in ("bytes_up", "bytes_down", "train_bytes_up", "train_bytes_down", "steps")}
    accuracies = [result["test_accuracy"] for result in results]
    total.update(mean_test_accuracy=sum(accuracies) / len(accuracies), min_test_accuracy=min(accuracies))
    return {"pipeline": config.pipeline, "edges": edges, "per_edge": results, "total": total,
            "server": server_summary, "seconds": round(time.perf_counter() - started, 3)}
