"""The one typed configuration of a run; the CLI and the tests build the same object."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sparse_rt.assembly import DEFAULT_MAX_LR_SCALE, at_cut
from sparse_rt.cluster.group import MERGES, ROUND_SECONDS
from sparse_rt.errors import ConfigError
from sparse_rt.pipeline import Pipeline, TrainingSettings
from sparse_rt.server.sessions import DEFAULT_MAX_BATCH, MAX_SESSIONS, SESSION_IDLE_SECONDS
from sparse_rt.train.schedules import deprune, parse_phases
from sparse_rt.wire.codecs import codec_names
from sparse_rt.wire.header import MAX_CHANNELS, MAX_CUT_NAME

TRANSPORTS = ("inproc", "ipc")


@dataclass(frozen=True)
class RunConfig:
    """A split training run plus its evaluation. ``None`` means the pipeline's default."""

    pipeline: str
    budget: int | None = None  # channels sent per sample; None = all (B = C)
    epochs: int | None = None
    codec: str = "fp32"  # wire dtype: fp32, fp16 or int8
    lz4: bool = False  # lz4 frame compression on top of the codec
    data: Path | None = None  # a user's .npz instead of the pipeline's own data
    seed: int = 0
    batch_size: int | None = None
    lr: float | None = None
    resolution: int | None = None  # resolution compression r at the cut (0 = off)
    transport: str = "inproc"  # inproc:// (one process) or ipc:// (a socket file)
    request_timeout: float = 60.0  # seconds without a reply before the edge gives up
    progress: bool = True
    cut: str | None = None  # the layer to cut after (sparse_rt.model.split.cut_points); None = the pipeline's

    def __post_init__(self) -> None:
        if self.codec not in codec_names():
            raise ConfigError(f"unknown codec '{self.codec}'; expected one of {', '.join(codec_names())}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport '{self.transport}'; expected one of {', '.join(TRANSPORTS)}")
        for name in ("budget", "epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.resolution is not None and not 0 <= self.resolution <= 8:
            raise ConfigError(f"resolution must be between 0 (off) and 8, got {self.resolution}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.cut is not None and not (isinstance(self.cut, str) and 0 < len(self.cut) <= MAX_CUT_NAME):
            raise ConfigError(f"cut must be a layer name of 1 to {MAX_CUT_NAME} characters, got {self.cut!r}")

    def resolved(self, pipeline: Pipeline) -> TrainingSettings:
        """This run's training settings: its own where given, ``pipeline``'s defaults otherwise."""
        return TrainingSettings.resolve(pipeline, batch_size=self.batch_size, lr=self.lr, epochs=self.epochs,
                                        resolution=self.resolution)

    def cut_pipeline(self, pipeline: Pipeline) -> Pipeline:
        """``pipeline`` cut where this run cuts it (its ``cut``, else the pipeline's own), the layer checked now.

        A layer that is no cut point raises SplitError listing the valid ones, before anything is trained.
        """
        return at_cut(pipeline, self.cut)


ROLES = ("server", "edge", "broker")
MODES = ("train", "infer")


@dataclass(frozen=True)
class NodeConfig:
    """One node process: a server, an edge or a broker. Read from TOML (``--config``) and the command line."""

    role: str
    pipeline: str = ""  # every role but the broker's
    bind: str | None = None  # server: e.g. tcp://127.0.0.1:5555; broker: the address edges connect to
    connect: str | None = None  # edge: the server's address
    join: str | None = None  # server: a broker's backend to join as one of its replicas, instead of binding
    backend: str | None = None  # broker: the address replicas join
    threads: int | None = None  # torch's threads in this process (None: torch's default, one per core)
    mode: str = "train"  # edge: train the head with the server, or ask for predictions
    budget: int | None = None
    epochs: int | None = None
    codec: str = "fp32"
    lz4: bool = False
    data: Path | None = None
    seed: int = 0
    batch_size: int | None = None
    lr: float | None = None
    resolution: int | None = None
    shard: str | None = None  # edge: "K/N" trains on the K-th of N parts of the training data (1-based)
    phases: str | None = None  # edge: deprune's ascending BUDGET:EPOCHS schedule instead of --budget/--epochs
    boost: float = 1.0  # edge: deprune's learning-rate factor for the first boost_epochs after a raise
    boost_epochs: int = 0
    models: Path | None = None  # a model set (sparse-rt train prune): served per budget, inference only
    checkpoint: Path | None = None  # the server's tail or the edge's head, state_dict + optimizer
    checkpoint_every: int = 0  # steps between periodic checkpoints; 0 = only on a clean stop
    resume: bool = False  # start from the checkpoint
    metrics: Path | None = None  # JSONL, one record per message
    max_batch: int = DEFAULT_MAX_BATCH  # server: largest batch a message may carry; sets ZeroMQ's MAXMSGSIZE
    request_timeout: float = 30.0  # edge: seconds to wait for one reply before retrying
    retries: int = 2  # edge: resends of a request without reply before giving up
    inflight: int = 4  # edge: inference requests in flight at once
    deadline_ms: float | None = None  # edge, inference with a model set: choose budget and codec per request for it
    max_bytes_per_s: float | None = None  # edge, with deadline_ms: a cap on the traffic those choices make
    early_exit: bool = False  # edge, with deadline_ms: the choices include the model set's early exits
    json: bool = False  # print one JSON summary object on stdout at the end
    log_level: str = "info"
    curve_key: Path | None = None  # this node's NAME.key_secret: CURVE encryption and authentication
    allow_keys: Path | None = None  # server: folder of public keys that may train (and infer)
    allow_infer_keys: Path | None = None  # server: folder of public keys that may infer only
    server_key: Path | None = None  # edge: the server's NAME.key (or the broker's); a replica: its broker's
    allow_replica_keys: Path | None = None  # broker: folder of the public keys of the replicas that may join it
    max_grad_norm: float | None = None  # server: refuse a step whose gradient norm is above this (None: no bound)
    max_lr_scale: float = DEFAULT_MAX_LR_SCALE  # server: the largest learning-rate factor it applies for a peer
    max_sessions: int = MAX_SESSIONS  # server: open sessions at once
    session_idle: float = SESSION_IDLE_SECONDS  # server: seconds without a message after which a session ends
    merge: str = "sum"  # server under torchrun: how the replicas combine their steps each round
    round_seconds: float = ROUND_SECONDS  # server under torchrun: seconds between the replicas' rounds

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got '{self.role}'")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.role == "server" and not (self.bind or self.join) or self.role == "broker" and not self.bind:
            raise ConfigError(f"a {self.role} needs an address to bind, e.g. --bind tcp://127.0.0.1:5555"
                              + (" (or --join BROKER_BACKEND)" if self.role == "server" else ""))
        if self.role == "server" and self.bind and self.join:
            raise ConfigError("a server binds its own address (--bind) or joins a broker (--join), not both")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ConfigError(f"threads must be a whole number of at least 1, got {self.threads!r}")
        if self.role == "broker" and not self.backend:
            raise ConfigError("a broker needs the address its replicas join, e.g. --backend tcp://127.0.0.1:5556")
        if self.role != "broker" and not self.pipeline:
            raise ConfigError("a node needs --pipeline (on the command line or in --config)")
        if self.role == "edge" and not self.connect:
            raise ConfigError("an edge needs the server's address, e.g. --connect tcp://127.0.0.1:5555")
        if self.models is not None and (self.mode != "infer" and self.role == "edge" or self.resume):
            raise ConfigError("a model set serves inference only: use --mode infer, without --resume")
        if self.deadline_ms is not None and (self.role != "edge" or self.mode != "infer" or self.models is None):
            raise ConfigError("--deadline-ms chooses among a model set's budgets per request: an edge with "
                              "--mode infer and --models FOLDER")
        for name in ("deadline_ms", "max_bytes_per_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.max_bytes_per_s is not None and self.deadline_ms is None:
            raise ConfigError("--max-bytes-per-s caps what the deadline controller chooses: give --deadline-ms too")
        if self.early_exit and self.deadline_ms is None:
            raise ConfigError("--early-exit lets the deadline controller answer on the device: give --deadline-ms too")
        if self.resume and self.checkpoint is None:
            raise ConfigError("--resume needs --checkpoint PATH to resume from")
        if self.shard is not None:
            shard_index(self.shard)
        if self.phases is not None and (self.budget is not None or self.epochs is not None or self.mode != "train"):
            raise ConfigError("--phases is a training schedule that sets budgets and epochs itself: "
                              "leave out --budget and --epochs, and use --mode train")
        if self.phases is not None:  # the form now, before connecting; the budgets against C once it is known
            deprune(parse_phases(self.phases, MAX_CHANNELS), self.boost, self.boost_epochs)
        for name in ("checkpoint_every", "retries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("max_batch", "inflight", "max_sessions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        allowing = self.allow_keys is not None or self.allow_infer_keys is not None
        if self.role in ("server", "broker") and (self.curve_key is None) != (not allowing):
            raise ConfigError(f"CURVE on a {self.role} needs both --curve-key (its .key_secret) and --allow-keys "
                              "and/or --allow-infer-keys (folders of the edges' .key files)")
        if self.role == "broker" and (self.curve_key is None) != (self.allow_replica_keys is None):
            raise ConfigError("CURVE on a broker needs --allow-replica-keys too (the folder of the replicas' .key "
                              "files): the replicas are authenticated as the edges are")
        if self.role != "broker" and self.allow_replica_keys is not None:
            raise ConfigError("--allow-replica-keys is a broker's")
        if self.role == "server" and self.join and (self.curve_key is None) != (self.server_key is None):
            raise ConfigError("CURVE on a replica needs --server-key too (its broker's .key): the replica "
                              "checks the broker, as an edge checks its server")
        if self.role == "server" and not self.join and self.server_key is not None:
            raise ConfigError("--server-key is an edge's, or a replica's (with --join): the broker's public key")
        if self.role == "edge" and (self.curve_key is None) != (self.server_key is None):
            raise ConfigError("CURVE on an edge needs both --curve-key (its .key_secret) and --server-key "
                              "(the server's .key)")
        for name in ("max_grad_norm", "max_lr_scale", "session_idle"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.merge not in MERGES:
            raise ConfigError(f"merge must be one of {', '.join(MERGES)}, got '{self.merge}'")
        if not (isinstance(self.round_seconds, (int, float)) and 0 < self.round_seconds < float("inf")):
            raise ConfigError(f"round_seconds must be a positive number, got {self.round_seconds!r}")
        if not self.request_timeout > 0:
            raise ConfigError(f"request_timeout must be positive, got {self.request_timeout}")
        # the options shared with `sparse-rt run` are checked in one place
        RunConfig(self.pipeline, self.budget, self.epochs, self.codec, self.lz4, self.data, self.seed,
                  self.batch_size, self.lr, self.resolution)

    def run_config(self) -> RunConfig:
        return RunConfig(self.pipeline, self.budget, self.epochs, self.codec, self.lz4, self.data, self.seed,
                         self.batch_size, self.lr, self.resolution, progress=False)

    def resolved(self, pipeline: Pipeline) -> TrainingSettings:
        """This node's training settings: its own where given, ``pipeline``'s defaults otherwise (as a run's)."""
        return self.run_config().resolved(pipeline)


def shard_index(shard: str) -> tuple[int, int]:
    """'K/N' -> (K, N), 1 <= K <= N."""
    try:
        k, n = (int(part) for part in shard.split("/"))
    except ValueError:
        raise ConfigError(f"shard must look like K/N (e.g. 2/4), got '{shard}'") from None
    if not 1 <= k <= n:
        raise ConfigError(f"shard K/N needs 1 <= K <= N, got '{shard}'")
    return k, n


def load_node_config(path: Path | None, overrides: dict[str, Any]) -> NodeConfig:
    """Settings from a TOML file, then the command line's options on top (``None`` = not given)."""
    settings: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                settings = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        known = {f.name for f in fields(NodeConfig)} - {"request_timeout"} | {"timeout"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "timeout" in settings:  # the file's name for the CLI's --timeout
        settings["request_timeout"] = settings.pop("timeout")
    settings.update({key: value for key, value in overrides.items() if value is not None})
    for key in ("data", "checkpoint", "metrics", "models", "curve_key", "allow_keys", "allow_infer_keys",
                "server_key", "allow_replica_keys"):
        if settings.get(key) is not None:
            settings[key] = Path(settings[key])
    if "role" not in settings or "pipeline" not in settings and settings["role"] != "broker":
        raise ConfigError("a node needs --role and --pipeline (on the command line or in --config)")
    try:
        return NodeConfig(**settings)
    except TypeError as exc:
        raise ConfigError(f"invalid node settings: {exc}") from None
