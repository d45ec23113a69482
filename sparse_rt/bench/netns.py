"""A link shaped by the kernel: a throwaway network namespace whose loopback goes through tc netem.

Server and edge run in one namespace and talk over its own ``lo``. Every
packet, whichever way it goes, leaves through lo's one netem queue, so the
two directions share one link of ``rate`` and each packet is delayed once by
``delay`` (the one-way delay): the same half-duplex link that
:class:`~sparse_rt.transport.shaper.Shaper` models, but with the kernel's TCP
in between. Nothing outside the namespace is touched, so other traffic on the
machine is never slowed. Needs root, ``ip`` and ``tc``, and the sch_netem
module: :func:`netem_problem` says which of them is missing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from typing import Iterator, Sequence

NETEM_LIMIT = 100_000  # packets netem may hold: far more than any one benchmark step puts in flight


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise OSError(f"'{' '.join(argv)}' failed ({done.returncode}): {done.stderr.strip()}")
    return done


@contextmanager
def namespace() -> Iterator[str]:
    """A new network namespace with its loopback up, deleted afterwards whatever happens."""
    name = f"sparse-rt-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        _run(["ip", "netns", "delete", name], check=False)


def netem_args(rate_bps: float, delay_s: float) -> list[str]:
    """tc's words for the link: delay in microseconds, rate in bit/s, a queue that never drops a step's packets."""
    return ["netem", "delay", f"{round(delay_s * 1e6)}us", "rate", f"{round(rate_bps)}bit", "limit", str(NETEM_LIMIT)]


def shape_loopback(name: str, rate_bps: float, delay_s: float) -> None:
    """Put the link on the namespace's loopback (replacing any earlier one)."""
    _run(["tc", "-n", name, "qdisc", "replace", "dev", "lo", "root", *netem_args(rate_bps, delay_s)])


def netem_problem() -> str | None:
    """Why the kernel shaper cannot run here (one line), or None when it can; tried in a throwaway namespace."""
    if os.geteuid() != 0:
        return "not root: creating network namespaces needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    try:
        with namespace() as name:
            done = _run(["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", *netem_args(1e6, 1e-3)], check=False)
            if done.returncode != 0:
                return f"tc netem is unavailable in this kernel ({done.stderr.strip() or done.returncode})"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    return None


def run_inside(name: str, argv: Sequence[str], stdin: str, timeout: float) -> str:
    """Run ``argv`` inside the namespace; its stdout, or an error with the end of its stderr."""
    done = subprocess.run(["ip", "netns", "exec", name, *argv], input=stdin, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark inside namespace {name} failed ({done.returncode}):\n"
                           + "\n".join(done.stderr.strip().splitlines()[-20:]))
    return done.stdout
