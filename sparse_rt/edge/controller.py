"""Choosing, before each inference request, what to send: the cut, budget, codec and exit that meet a deadline.

A model set (`sparse-rt train prune`, per cut) holds one head and tail per
cut and budget; its manifest says how accurate each is, how many bytes a
sample costs in each codec and, with `sparse-rt train exit`, how many samples
its early exit answers at each threshold and how well. With the link
estimate (estimate.py) the edge predicts every choice's latency: its own and
the server's compute, as measured per choice, plus the network's time for
the bytes it sends. Among the choices predicted to meet
the deadline it takes the most accurate; when none does, the fastest, and
the decision says so.

A policy is any object with ``options`` (the choices it may make),
``choose(estimate, samples) -> Decision`` and ``observed(decision,
total_ms, network_ms)``; :class:`DeadlineController`
is the one this runtime ships, and ``EdgeClient(policy=...)`` takes another.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from sparse_rt.edge.estimate import SMALL_BYTES, Ewma, LinkEstimate
from sparse_rt.wire.header import entry_name

# Codecs in order of precision: when two choices are equally accurate by the manifest, the more precise wins.
PRECISION = ("fp32", "fp16", "int8")
# Bytes of a request and a reply beyond the sent values (headers, indices, logits): small, but they are
# what a choice of a few channels costs on a slow link.
REQUEST_OVERHEAD_BYTES = 256
REPLY_BYTES_PER_SAMPLE = 4 * 10  # float32 logits, 10 classes, until the first reply says how many


@dataclass(frozen=True)
class Choice:
    """What one request sends: this budget's model, its values in this codec; optionally an early exit first.

    ``exit`` is the confidence threshold of the model's early exit (None: no
    exit, every sample goes to the server); ``cut`` the layer the model is cut
    after (None: the model set's default cut).
    """

    budget: int
    codec: str = "fp32"
    lz4: bool = False
    exit: float | None = None
    cut: str | None = None

    @property
    def label(self) -> str:
        model = f"{self.cut}:{self.budget}" if self.cut is not None else str(self.budget)
        exit = "" if self.exit is None else f"@{self.exit:g}"
        return f"{model}/{entry_name((self.codec, self.lz4))}{exit}"


@dataclass(frozen=True)
class Option:
    """A choice with what the model set says of it: its accuracy and the bytes a sample sends on average.

    With an early exit, ``exit_share`` of the samples are answered on the
    device, so ``bytes_per_sample`` counts only the rest.
    """

    choice: Choice
    accuracy: float
    bytes_per_sample: float
    exit_share: float = 0.0


@dataclass(frozen=True)
class Decision:
    """The choice for one request, its predicted latency (None: not predictable yet) and whether that meets."""

    option: Option
    predicted_ms: float | None
    meets: bool
    deadline_ms: float
    probe: bool = False  # sent to measure the link's rate, which the recent choices were too small to show

    @property
    def choice(self) -> Choice:
        return self.option.choice


class Policy(Protocol):
    """What EdgeClient asks before each request; ``options`` are every choice it may make (their encodings are
    agreed with the server at the handshake)."""

    options: Sequence[Option]

    def choose(self, estimate: LinkEstimate, samples: int) -> Decision: ...

    def observed(self, decision: Decision, total_ms: float, network_ms: float | None) -> None: ...


def options_from_manifest(manifest: dict[str, Any], codecs: Sequence[str] = PRECISION,
                          lz4: bool = False, exits: bool = False) -> list[Option]:
    """Every (budget, codec) the model set can serve, with the manifest's accuracy and bytes per sample.

    A manifest entry's ``accuracy`` per codec is used where it was measured;
    otherwise its accuracy on its exit's calibration images, where `sparse-rt
    train exit` measured one, else the budget's ``test_accuracy`` (measured in
    fp32), stands for every codec, and precision breaks the tie. With ``exits``, each also with
    its early exit at every calibrated threshold that answers some samples
    on the device (`sparse-rt train exit`), at the calibrated accuracy.
    """
    options = []
    default = manifest.get("cut")
    cuts = {str(model.get("cut", default)) for model in manifest["models"]}
    for model in manifest["models"]:
        sizes = model.get("bytes_per_sample", {})
        measured = model.get("accuracy", {})
        cut = str(model.get("cut", default))
        cut = cut if len(cuts) > 1 else None  # named where the set holds several, as EdgeClient's requests name it
        calibration = model.get("exit", {}).get("calibration", []) if exits else []
        # Where `train exit` measured it, the model alone is judged on the images its exit was calibrated on,
        # with or without exits among the options: every choice is then made on one set of images (not an
        # easier half against the whole), and the others are left for measuring the choices (bench adaptive).
        plain = model.get("exit", {}).get("server_accuracy")
        for codec in codecs:
            if codec not in sizes:
                continue
            accuracy = plain if plain is not None else measured.get(codec, model["test_accuracy"])
            options.append(Option(Choice(int(model["budget"]), codec, lz4, cut=cut), float(accuracy),
                                  float(sizes[codec])))
            for row in calibration:
                share = float(row["share"])
                if share > 0:
                    options.append(Option(Choice(int(model["budget"]), codec, lz4, float(row["threshold"]), cut),
                                          float(row["accuracy"]), float(sizes[codec]) * (1 - share), share))
    if not options:
        raise ValueError("the model set's manifest lists no budget in any of the codecs "
                         f"{', '.join(codecs)}: nothing to choose from")
    if exits and not any(o.choice.exit is not None for o in options):
        raise ValueError("the model set has no early exits: add them with `sparse-rt train exit DIR`")
    return options


@dataclass
class DeadlineController:
    """The most accurate choice predicted to answer within ``deadline_ms``; else the fastest.

    ``margin`` is the share of the deadline a prediction may fill: the
    estimate is an average, and the requests that miss are the slow ones.
    ``max_bytes_per_s`` caps the traffic: choices that would send more at the
    rate requests arrive are left out.
    """

    options: Sequence[Option]
    deadline_ms: float
    margin: float = 0.8
    max_bytes_per_s: float | None = None
    classes: int | None = None
    probe_every: int = 10  # requests too small to measure the rate, before one that does
    clock: Callable[[], float] = time.monotonic
    _compute: dict[Choice, Ewma] = field(default_factory=dict)  # head + server + decode per choice, ms
    _interval: Ewma = field(default_factory=lambda: Ewma(0.2))  # seconds between requests
    _last_call: float | None = None

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError("a controller needs at least one option")
        if not (self.deadline_ms > 0 and math.isfinite(self.deadline_ms)):
            raise ValueError(f"the deadline must be a positive number of ms, got {self.deadline_ms}")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")
        if self.max_bytes_per_s is not None and not self.max_bytes_per_s > 0:
            raise ValueError(f"max_bytes_per_s must be a positive number, got {self.max_bytes_per_s}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be at least 1, got {self.probe_every}")

    def _local_only(self, option: Option) -> bool:
        """Whether every sample is sure to be answered on the device: only at a threshold no softmax can miss."""
        threshold = option.choice.exit
        return threshold is not None and threshold <= 1 / (self.classes or REPLY_BYTES_PER_SAMPLE // 4)

    def _compute_ms(self, choice: Choice) -> float:
        known = self._compute.get(choice)
        if known is not None and known.value is not None:
            return known.value
        # Untried: like the same model (cut and budget) in another codec, answered the same way (on the device
        # only, or not), else like the average of those tried.
        local = self._local_only(Option(choice, 0.0, 0.0))
        same = [e.value for c, e in self._compute.items()
                if e.value is not None and (c.cut, c.budget) == (choice.cut, choice.budget)
                and self._local_only(Option(c, 0.0, 0.0)) == local]
        tried = same or [e.value for e in self._compute.values() if e.value is not None]
        return sum(tried) / len(tried) if tried else 0.0

    def _bytes(self, option: Option, samples: int) -> tuple[int, int]:
        up = REQUEST_OVERHEAD_BYTES + math.ceil(option.bytes_per_sample * samples)
        sent = samples * (1 - option.exit_share)  # the server answers only the samples the exit does not
        return up, REQUEST_OVERHEAD_BYTES // 2 + math.ceil(sent * 4 * (self.classes or REPLY_BYTES_PER_SAMPLE // 4))

    def predict_ms(self, option: Option, estimate: LinkEstimate, samples: int) -> float | None:
        if self._local_only(option):  # every sample is answered on the device: nothing crosses the network
            return self._compute_ms(option.choice)
        network = estimate.predict_ms(*self._bytes(option, samples))
        return None if network is None else network + self._compute_ms(option.choice)

    def _measuring(self, options: Sequence[Option], samples: int) -> list[Option]:
        """The options whose requests are large enough to show the link's rate, not only its round trip.

        Only those without an exit: how many samples an exit leaves to send
        is known only after it ran, so a probe's size would be a guess.
        """
        return [o for o in options if o.exit_share == 0 and sum(self._bytes(o, samples)) > SMALL_BYTES]

    def _probe(self, options: Sequence[Option], estimate: LinkEstimate, samples: int) -> Decision:
        """The fewest bytes that still measure the rate (a larger request than the round trip alone)."""
        option = min(self._measuring(options, samples), key=lambda o: o.bytes_per_sample)
        ms = self.predict_ms(option, estimate, samples)
        return Decision(option, ms, ms is not None and ms <= self.deadline_ms * self.margin, self.deadline_ms, True)

    def _affordable(self, options: Iterable[Option], samples: int) -> list[Option]:
        if self.max_bytes_per_s is None or self._interval.value is None:
            return list(options)
        per_second = samples / max(self._interval.value, 1e-6)
        within = [o for o in options if o.bytes_per_sample * per_second <= self.max_bytes_per_s]
        return within or [min(self.options, key=lambda o: o.bytes_per_sample)]

    def choose(self, estimate: LinkEstimate, samples: int) -> Decision:
        now = self.clock()
        if self._last_call is not None:
            self._interval.add(now - self._last_call)
        self._last_call = now
        options = self._affordable(self.options, samples)
        predicted = [(option, self.predict_ms(option, estimate, samples)) for option in options]
        # The rate matters to some choice, and it is not known, or not known of late: measure it.
        if self._measuring(options, samples) and (any(ms is None for _, ms in predicted)
                                                  or estimate.rate_age >= self.probe_every):
            return self._probe(options, estimate, samples)
        budget = self.deadline_ms * self.margin
        meeting = [(o, ms) for o, ms in predicted if ms is not None and ms <= budget]
        if meeting:
            option, ms = max(meeting, key=lambda pair: (pair[0].accuracy, _precision(pair[0].choice), -pair[1]))
            return Decision(option, ms, True, self.deadline_ms)
        option, ms = min(predicted, key=lambda pair: (pair[1] if pair[1] is not None else math.inf,
                                                      pair[0].bytes_per_sample))
        return Decision(option, ms, False, self.deadline_ms)

    def observed(self, decision: Decision, total_ms: float, network_ms: float | None) -> None:
        """A request's whole time, and the part the network took (the rest is compute at either end).

        ``network_ms`` is 0 for a request answered on the device, None when
        the network's part is not known (the server did not say its time).
        """
        if network_ms is None or not (math.isfinite(total_ms) and math.isfinite(network_ms)):
            return
        self._compute.setdefault(decision.choice, Ewma(0.3)).add(max(total_ms - network_ms, 0.0))


def _precision(choice: Choice) -> int:
    """Higher is more precise; codecs of one's own rank below the built-ins."""
    return len(PRECISION) - PRECISION.index(choice.codec) if choice.codec in PRECISION else 0
