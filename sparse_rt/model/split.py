"""Cut a model at a named layer into a head and a tail.

``split_model(model, "layer2")`` traces ``model`` once with torch.fx, finds the
last graph node that belongs to ``layer2`` and copies the nodes before and after
it into two ``fx.GraphModule``\\ s, so that ``tail(head(x)) == model(x)``. Both
halves are built on the original model, so they hold the very same parameters:
training the halves trains the model.

A cut is only valid where exactly one value crosses it, because the runtime
sends one activation from the device to the server. Inside a residual block the
skip connection also crosses, so ``layer2.0.conv1`` of a ResNet is not a cut
point while ``layer2.0`` is. :func:`cut_points` lists every valid name.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from sparse_rt.errors import SplitError

__all__ = ["SplitModel", "split_model", "cut_points"]

# Nodes that do computation. Placeholders, get_attr and output do not, so a tail
# made of them only would just forward the head's result.
_CALL_OPS = ("call_module", "call_function", "call_method")


@dataclass
class SplitModel:
    """The two halves of a model cut after layer ``cut``.

    Both halves share their parameters and leaf modules (BatchNorm, Dropout,
    ...) with the original model: an optimizer step on the halves trains the
    model, and ``head.eval()`` switches the model's layers before the cut too.
    """

    head: nn.Module  # fx.GraphModule: model inputs -> activation after `cut`
    tail: nn.Module  # fx.GraphModule: activation after `cut` -> model output
    cut: str  # qualified name of the layer cut after, as in named_modules()


class _ScopeTracer(fx.Tracer):
    """An fx tracer that records which module each node was created in.

    ``node.meta["sparse_rt_scope"]`` is the qualified name of the innermost
    module being called when the node was made ("" for the model's own forward).
    """

    def __init__(self) -> None:
        super().__init__()
        self._scope = ""

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        outer, self._scope = self._scope, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._scope = outer

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **kw: Any) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        proxy.node.meta["sparse_rt_scope"] = self._scope
        return proxy


@dataclass
class _Trace:
    """One trace of a model and, for every layer name, where a cut would go."""

    nodes: list[fx.Node]
    last_node: dict[str, int]  # layer name -> index of its last node, forward order
    crossing: list[int]  # node index i -> how many values cross a cut after node i
    last_use: list[int]  # node index -> index of its last user (itself if unused)
    last_call: int  # index of the last node that computes something

    def is_valid(self, i: int) -> bool:
        return i < self.last_call and self.crossing[i] == 1 and self.last_use[i] > i

    def crossing_nodes(self, i: int) -> list[fx.Node]:
        return [n for j, n in enumerate(self.nodes[: i + 1]) if n.op != "get_attr" and self.last_use[j] > i]

    def valid_names(self) -> list[str]:
        """Valid cut points, in forward order; at one position the outer layer comes first."""
        return [name for name, i in self.last_node.items() if self.is_valid(i)]


@contextmanager
def _no_leftover_constants(model: nn.Module) -> Iterator[None]:
    """fx stores tensors that forward creates (``torch.tensor(...)``) on the traced
    model as ``_tensor_constant0``, ... The halves keep their own reference to them;
    the user's model should not grow new attributes at every split."""
    before = set(vars(model))
    try:
        yield
    finally:
        for key in set(vars(model)) - before:
            delattr(model, key)


def _trace(model: nn.Module) -> _Trace:
    name = type(model).__name__
    try:
        graph = _ScopeTracer().trace(model)
    except Exception as exc:
        raise SplitError(
            f"cannot split {name}: torch.fx could not trace its forward ({type(exc).__name__}: {exc}). "
            "split_model needs a model that torch.fx can trace symbolically: no Python control flow "
            "on tensor values, no data-dependent shapes. Rewrite that part of forward, or wrap it in a "
            "module of its own; see https://pytorch.org/docs/stable/fx.html#limitations-of-symbolic-tracing"
        ) from exc

    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last_use = [max((index[u] for u in n.users), default=i) for i, n in enumerate(nodes)]
    # Node j crosses every cut after nodes j .. last_use[j] - 1. Parameters and
    # constants (get_attr) never cross: the tail reads them from the model itself.
    delta = [0] * (len(nodes) + 1)
    for j, n in enumerate(nodes):
        if n.op != "get_attr" and last_use[j] > j:
            delta[j] += 1
            delta[last_use[j]] -= 1
    crossing, running = [], 0
    for d in delta[:-1]:
        running += d
        crossing.append(running)

    order = {s: k for k, (s, _) in enumerate(model.named_modules())}
    last_node: dict[str, int] = {}
    for i, n in enumerate(nodes):
        scope = n.meta.get("sparse_rt_scope", "")
        parts = scope.split(".") if scope else []
        for depth in range(1, len(parts) + 1):  # the node belongs to every enclosing layer
            last_node[".".join(parts[:depth])] = i
    ranked = sorted(last_node, key=lambda s: (last_node[s], order.get(s, len(order))))
    last_call = max((i for i, n in enumerate(nodes) if n.op in _CALL_OPS), default=-1)
    return _Trace(nodes, {s: last_node[s] for s in ranked}, crossing, last_use, last_call)


def cut_points(model: nn.Module) -> list[str]:
    """Every name ``split_model(model, at)`` accepts, in forward order.

    A layer called more than once is placed at its last call. Layers after which
    more than one value is still needed (inside residual blocks) and the final
    layer (nothing would be left for the tail) are left out.
    """
    with _no_leftover_constants(model):
        return _trace(model).valid_names()


def split_model(model: nn.Module, at: str) -> SplitModel:
    """Cut ``model`` after the last graph node of the layer named ``at``.

    ``at`` is a qualified name from ``model.named_modules()``, e.g. ``"layer2"``
    of a ResNet (after the whole stage) or ``"features.3"`` of a MobileNet.
    Raises :class:`SplitError` when ``at`` is not a layer, when more than one
    value would cross the cut, when ``at`` is the last layer, or when torch.fx
    cannot trace the model.

    The model is traced in its current mode. Leaf modules (BatchNorm, Dropout)
    follow ``train()``/``eval()`` later on, but Python code that branches on
    ``self.training`` inside a traced (non-leaf) forward is fixed at trace time.
    """
    with _no_leftover_constants(model):
        return _split(model, at)


def _split(model: nn.Module, at: str) -> SplitModel:
    name = type(model).__name__
    trace = _trace(model)
    valid = trace.valid_names()
    listing = f"Valid cut points (in forward order): {', '.join(valid) or 'none'}"
    if at not in trace.last_node:
        if at == "":
            why = "is the whole model, not a layer of it"
        elif at in dict(model.named_modules()):
            why = f"is a layer of {name} that its forward never calls"
        else:
            why = f"is not a layer of {name}"
        raise SplitError(f"{at!r} {why}. {listing}")
    i = trace.last_node[at]
    if i >= trace.last_call:
        raise SplitError(
            f"{at!r} is the last layer of {name}: cutting after it leaves nothing for the tail. "
            f"Cut at an earlier layer. {listing}"
        )
    if trace.last_use[i] <= i:
        raise SplitError(f"cannot cut {name} after {at!r}: the rest of the model does not use its output. {listing}")
    if not trace.is_valid(i):
        sent = [n.name for n in trace.crossing_nodes(i)]
        # At each position the outermost layer comes first: suggest that one.
        before = max((trace.last_node[s] for s in valid if trace.last_node[s] < i), default=None)
        after = min((trace.last_node[s] for s in valid if trace.last_node[s] > i), default=None)
        nearest = [
            f"{next(s for s in valid if trace.last_node[s] == j)!r} ({where})"
            for j, where in ((before, "before"), (after, "after"))
            if j is not None
        ]
        raise SplitError(
            f"cannot cut {name} after {at!r}: the cut would need to send {len(sent)} tensors "
            f"({', '.join(sent)}) but a split sends exactly one (inside a residual block the skip "
            f"connection also crosses). Nearest valid cut points: {' or '.join(nearest) or 'none'}"
        )
    head, tail = _build_halves(model, trace, i)
    return SplitModel(head=head, tail=tail, cut=at)


def _build_halves(model: nn.Module, trace: _Trace, i: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    cut = trace.nodes[i]

    head_graph, env = fx.Graph(), {}
    for n in trace.nodes[: i + 1]:
        env[n] = head_graph.node_copy(n, lambda a: env[a])
    head_graph.output(env[cut])
    for n in list(head_graph.nodes):  # parameters only the tail reads
        if n.op == "get_attr" and not n.users:
            head_graph.erase_node(n)

    tail_graph = fx.Graph()
    env = {cut: tail_graph.placeholder(cut.name)}
    for j, n in enumerate(trace.nodes[:i]):  # parameters both halves read are read twice
        if n.op == "get_attr" and trace.last_use[j] > i:
            env[n] = tail_graph.node_copy(n)
    for n in trace.nodes[i + 1:]:
        env[n] = tail_graph.node_copy(n, lambda a: env[a])

    name = type(model).__name__
    halves = []
    for graph, part in ((head_graph, "Head"), (tail_graph, "Tail")):
        graph.lint()
        gm = fx.GraphModule(model, graph, class_name=f"{name}{part}")
        gm.training = model.training  # not .train(): that would reset the shared layers
        halves.append(gm)
    return halves[0], halves[1]
