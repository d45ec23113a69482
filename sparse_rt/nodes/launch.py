"""Start `sparse-rt node` processes on this machine: `sparse-rt run --edges N` and the tests use it.

Each node is a real child process (``python -m sparse_rt node ...``) talking
tcp:// over loopback. Threads drain each child's log (stderr) and
stdout, so it can never block on a full pipe; the server's "serving ... on ADDRESS" line tells
when it is ready and which port it bound.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

READY = re.compile(r"serving \S+ on (\S+?):? ")
BACKEND = re.compile(r"replicas join at (\S+)")  # a broker's second address


def node_arguments(options: dict[str, Any]) -> list[str]:
    """{'budget': 4, 'lz4': True, 'data': None} -> ['--budget', '4', '--lz4']."""
    arguments: list[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        arguments += [flag] if value is True else [flag, str(value)]
    return arguments


class NodeProcess:
    """One `sparse-rt node` child process; its log lines are kept in ``log`` (and echoed if asked).

    ``env`` adds environment variables to this process's for the child, e.g.
    ``PYTHONPATH`` so that it finds a module of one's own (a pipeline that
    registers its own codec).
    """

    def __init__(self, role: str, options: dict[str, Any], echo: str | None = None,
                 env: Mapping[str, str] | None = None, torchrun: Sequence[str] | None = None) -> None:
        node = ["-m", "sparse_rt", "node", "--role", role, *node_arguments(options)]
        # torchrun: its own options (e.g. --nproc-per-node 2): it starts the node that many times, as one group
        launcher = [] if torchrun is None else ["-m", "torch.distributed.run", *torchrun]
        command = [sys.executable, *launcher, *node]
        self.role = role
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=None if env is None else {**os.environ, **env})
        self.log: list[str] = []
        self.address: str | None = None
        self.backend: str | None = None  # a broker's: where its replicas join
        self._ready = threading.Event()
        self._echo = echo
        self._stdout: list[str] = []
        self._drains = [threading.Thread(target=self._read_log, name=f"{role} log", daemon=True),
                        threading.Thread(target=self._read_stdout, name=f"{role} stdout", daemon=True)]
        for drain in self._drains:
            drain.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        self._stdout.extend(self.process.stdout)

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if self._echo:
                sys.stderr.write(f"[{self._echo}] {line}")
            if self.address is None and (found := READY.search(line)):
                self.address = found.group(1)
                if found_backend := BACKEND.search(line):
                    self.backend = found_backend.group(1)
                self._ready.set()
        self._ready.set()  # the process ended: stop waiting for it

    def wait_ready(self, timeout: float = 120.0) -> str:
        """The address a server bound, once it serves; a server that died says why."""
        self._ready.wait(timeout)
        if self.address is None:
            self.process.kill()
            raise RuntimeError(f"the {self.role} node did not start serving within {timeout:g} s:\n"
                               + "".join(self.log[-20:]))
        return self.address

    def wait_for(self, text: str, count: int = 1, timeout: float = 60.0) -> None:
        """Until ``text`` is in ``count`` of the node's log lines (a broker's "joined", say); a timeout says so."""
        deadline = time.monotonic() + timeout
        while sum(text in line for line in list(self.log)) < count:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the {self.role} node did not log {text!r} {count} time(s) within {timeout:g} s:"
                                   "\n" + "".join(self.log[-20:]))
            time.sleep(0.05)

    def stop(self) -> None:
        """Ask for a clean stop, as Ctrl-C would."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def finish(self, timeout: float | None = None) -> tuple[int, str]:
        """Wait for the process to end; its exit code and stdout (both pipes are read by the drain threads)."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for drain in self._drains:
            drain.join(timeout=5)
        return self.process.returncode, "".join(self._stdout)

    def workers(self) -> list[int]:
        """The process ids of the nodes torchrun started (its children), lowest first."""
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone meanwhile
                continue
            if int(fields[1]) == self.process.pid:
                children.append(int(stat.parent.name))
        return sorted(children)

    def kill(self) -> None:
        """SIGKILL the node and the nodes torchrun started, which a killed torchrun would leave running."""
        for pid in self.workers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.kill()

    def results(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every JSON summary printed, one per line (a group under torchrun prints one per replica)."""
        code, stdout = self.finish(timeout)
        summaries = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        if not summaries:  # torchrun itself exits non-zero when stopped by a signal, after its nodes' summaries
            raise RuntimeError(f"the {self.role} node failed (exit code {code}):\n" + "".join(self.log[-20:]))
        return summaries

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The JSON summary the node printed (it must run with --json)."""
        code, stdout = self.finish(timeout)
        if code != 0 or not stdout.strip():
            raise RuntimeError(f"the {self.role} node failed (exit code {code}):\n" + "".join(self.log[-20:]))
        return json.loads(stdout)
