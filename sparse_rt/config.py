"""The one typed configuration of a run; the CLI and the tests build the same object."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparse_rt.errors import ConfigError
from sparse_rt.wire.codecs import CODEC_NAMES

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

    def __post_init__(self) -> None:
        if self.codec not in CODEC_NAMES:
            raise ConfigError(f"unknown codec '{self.codec}'; expected one of {', '.join(CODEC_NAMES)}")
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
