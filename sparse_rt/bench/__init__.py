"""`sparse-rt bench`: the numbers people choose a split runtime by, measured against a baseline in the same run.

Each suite is one module here with a ``command`` (its click command) and a
function that returns a :class:`~sparse_rt.bench.common.BenchReport`:

- transport: sparse-rt's framed messages vs plain pyzmq between the same two processes
- codec: fp32 / fp16 / int8 (+ lz4) on real activations: throughput, bytes, error
- e2e: split training and inference over loopback vs the same model unsplit
- edges: 1..32 edge processes on one server: throughput, fairness, latency, lost steps
- link: a constrained link (bandwidth, delay) vs the bound it allows
- exchange: one split exchange (train, infer) vs raw pyzmq and the compute alone
- restart: a server killed or stopped mid-training and resumed: how fast its edges go on, steps lost
- fuzz: hostile messages at a live server (crashes, hangs, NaN, wrong replies, memory) and many sessions' memory
- adaptive: inference with a deadline over a link whose rate changes: fixed budgets, the controller, an oracle
- scale: inference replicas behind a broker: 1 against 2, and one killed mid-run
"""

SUITES = ("transport", "codec", "e2e", "edges", "link", "exchange", "restart", "fuzz", "adaptive", "scale")
