"""The link estimate and the deadline controller, on given observations (no sockets: tests/test_adaptive.py has those)."""
from __future__ import annotations

import pytest

from sparse_rt.edge.controller import Choice, DeadlineController, Option, options_from_manifest
from sparse_rt.edge.estimate import LinkEstimate

MB = 1_000_000


def _link(rate_bps: float, rtt_ms: float, server_ms: float = 1.0, nbytes: int = 100_000, requests: int = 5,
          estimate: LinkEstimate | None = None) -> LinkEstimate:
    """An estimate fed with requests that took exactly what a link of this rate and round trip takes."""
    estimate = estimate or LinkEstimate()
    if estimate.rtt_ms is None:
        estimate.observe_round_trip(rtt_ms)
    for _ in range(requests):
        estimate.observe(nbytes, 500, rtt_ms + 8e3 * (nbytes + 500) / rate_bps + server_ms, server_ms)
    return estimate


def test_the_estimate_learns_round_trip_rate_and_server_time():
    estimate = _link(20 * MB, rtt_ms=10.0, server_ms=3.0)
    assert estimate.rtt_ms == pytest.approx(10.0)
    assert estimate.rate_bps == pytest.approx(20 * MB, rel=1e-6)
    assert estimate.server_ms == pytest.approx(3.0)
    assert estimate.predict_ms(50_000, 0) == pytest.approx(10.0 + 8e3 * 50_000 / (20 * MB))


def test_a_step_change_in_rate_is_taken_on_the_second_request_and_one_slow_reply_is_not():
    estimate = _link(50 * MB, rtt_ms=10.0)
    _link(50 * MB / 10, rtt_ms=10.0, requests=1, estimate=estimate)  # one slow reply: a suspect, not a change
    assert estimate.rate_bps == pytest.approx(50 * MB, rel=1e-6) and estimate.changes == 0
    _link(50 * MB, rtt_ms=10.0, requests=1, estimate=estimate)  # and back: the suspect is forgotten
    _link(5 * MB, rtt_ms=10.0, requests=1, estimate=estimate)
    assert estimate.changes == 0
    _link(5 * MB, rtt_ms=10.0, requests=1, estimate=estimate)  # the second in a row: the link changed
    assert estimate.changes == 1
    assert estimate.rate_bps == pytest.approx(5 * MB, rel=1e-6)
    _link(40 * MB, rtt_ms=10.0, requests=2, estimate=estimate)  # faster again: seen the same way
    assert estimate.changes == 2 and estimate.rate_bps == pytest.approx(40 * MB, rel=1e-6)


def test_noise_is_smoothed_not_followed():
    estimate = _link(10 * MB, rtt_ms=5.0)
    for factor in (1.2, 0.85, 1.3, 0.8):  # within the change ratio: averaged
        estimate.observe(100_000, 500, 5.0 + factor * 8e3 * 100_500 / (10 * MB) + 1.0, 1.0)
    assert estimate.changes == 0
    assert estimate.rate_bps == pytest.approx(10 * MB, rel=0.15)


def test_small_requests_measure_the_round_trip_and_age_the_rate():
    estimate = _link(10 * MB, rtt_ms=5.0)
    for _ in range(3):
        estimate.observe(800, 100, 8.0 + 1.0, 1.0)
    transfer = 8e3 * 900 / (10 * MB)  # taken off: the round trip is what is left
    assert estimate.rtt_ms == pytest.approx(5.0 + (3.0 - transfer) * (1 - 0.7 ** 3))
    assert estimate.rate_age == 3
    assert estimate.rate_bps == pytest.approx(10 * MB, rel=1e-6)


def test_a_server_claiming_more_time_than_the_wait_cannot_break_the_estimate():
    estimate = _link(10 * MB, rtt_ms=5.0)
    for claimed in (25.0, 1e300, -4.0):
        estimate.observe(50_000, 500, 20.0, claimed)  # a hostile or skewed server_ms
        snapshot = estimate.snapshot()  # no ZeroDivisionError, nothing non-finite
        assert all(value is None or value == value for value in snapshot.values())
    assert estimate.server_ms <= 20.0
    assert estimate.rate_bps is not None and estimate.rate_bps > 0


def test_small_requests_on_a_slow_link_do_not_count_their_transfer_as_round_trip():
    estimate = _link(1 * MB, rtt_ms=5.0)
    for _ in range(5):  # 3.8 KB: 30 ms of transfer at 1 Mbit/s
        estimate.observe(3_300, 500, 5.0 + 8e3 * 3_800 / MB, 0.0)
    assert estimate.rtt_ms == pytest.approx(5.0, abs=0.5)
    assert estimate.predict_ms(3_300, 500) == pytest.approx(5.0 + 30.4, abs=1.0)


def test_nonsense_times_are_ignored():
    estimate = _link(10 * MB, rtt_ms=5.0)
    before = (estimate.rtt_ms, estimate.rate_bps, estimate.samples)
    estimate.observe(100_000, 0, float("nan"))
    estimate.observe(100_000, 0, -3.0)
    assert (estimate.rtt_ms, estimate.rate_bps, estimate.samples) == before


# A model set of three budgets of 64 channels of 8x8 (cifar_cnn's cut), as its manifest states them.
MANIFEST = {"models": [
    {"budget": budget, "test_accuracy": accuracy,
     "bytes_per_sample": {"fp32": budget * 256.0, "fp16": budget * 128.0, "int8": budget * 64.0 + 4}}
    for budget, accuracy in ((64, 0.60), (16, 0.55), (2, 0.45))]}


def _controller(deadline_ms: float, **kwargs) -> DeadlineController:
    return DeadlineController(options_from_manifest(MANIFEST), deadline_ms, classes=10, **kwargs)


def test_the_manifest_gives_every_budget_in_every_codec():
    options = options_from_manifest(MANIFEST)
    assert len(options) == 9
    assert Option(Choice(16, "int8"), 0.55, 1028.0) in options
    assert {o.choice.codec for o in options_from_manifest(MANIFEST, codecs=("fp16",))} == {"fp16"}
    with pytest.raises(ValueError, match="nothing to choose"):
        options_from_manifest(MANIFEST, codecs=("bf16",))


@pytest.mark.parametrize("rate_mbps, expected", [
    (100, Choice(64, "fp32")),  # 8 x 16 KiB in 10.5 ms: the best model, most precise
    (20, Choice(64, "fp16")),  # fp32 needs 52 ms, over 0.8 x 50; half the bytes fit
    (5, Choice(16, "fp16")),  # 64 channels need 52 ms even as int8; 16 as fp16 take 26
    (1, Choice(2, "fp16")),  # only 2 channels fit, and not as fp32 (4 KiB: 45 ms)
])
def test_the_most_accurate_choice_that_meets_the_deadline(rate_mbps, expected):
    controller = _controller(50.0)
    decision = controller.choose(_link(rate_mbps * MB, rtt_ms=10.0, server_ms=0.0), samples=8)
    assert decision.choice == expected
    assert decision.meets and decision.predicted_ms <= 0.8 * 50.0
    assert not decision.probe


def test_when_nothing_meets_the_fastest_is_sent_and_the_decision_says_so():
    controller = _controller(12.0)
    decision = controller.choose(_link(1 * MB, rtt_ms=10.0, server_ms=0.0), samples=8)
    assert decision.choice == Choice(2, "int8")
    assert not decision.meets and decision.predicted_ms > 12.0 * 0.8


def test_measured_compute_per_choice_counts_in_the_prediction():
    controller = _controller(100.0)
    estimate = _link(100 * MB, rtt_ms=10.0, server_ms=0.0)
    first = controller.choose(estimate, samples=8)
    assert first.choice == Choice(64, "fp32")
    controller.observed(first, total_ms=90.0, network_ms=20.0)  # this model's compute takes 70 ms
    controller.observed(controller.choose(estimate, samples=8), total_ms=20.0, network_ms=15.0)
    assert controller.predict_ms(first.option, estimate, 8) == pytest.approx(10.0 + 8e3 * (8 * 16384 + 704) / 1e8
                                                                             + 70.0)
    decision = controller.choose(estimate, samples=8)
    assert decision.choice == Choice(16, "fp32") and decision.meets  # the slow model is passed over


def test_a_byte_rate_cap_leaves_out_the_choices_that_would_pass_it():
    clock = iter(i * 0.1 for i in range(100))  # a request every 100 ms
    controller = _controller(50.0, max_bytes_per_s=100_000, clock=lambda: next(clock))
    estimate = _link(100 * MB, rtt_ms=10.0, server_ms=0.0)
    controller.choose(estimate, samples=8)  # the first call only starts the clock
    decision = controller.choose(estimate, samples=8)
    assert decision.option.bytes_per_sample * 8 / 0.1 <= 100_000  # 80 samples/s x bytes per sample
    assert decision.choice == Choice(16, "int8")  # 1,028 bytes a sample: the most accurate under the cap


def test_before_the_rate_is_known_and_when_it_is_stale_the_controller_probes():
    controller = _controller(50.0, probe_every=3)
    estimate = LinkEstimate()
    estimate.observe_round_trip(10.0)
    probe = controller.choose(estimate, samples=8)
    assert probe.probe and probe.choice == Choice(2, "fp32")  # the fewest bytes that still show the rate
    _link(100 * MB, rtt_ms=10.0, server_ms=0.0, estimate=estimate)
    for _ in range(3):  # requests too small to show a fast link's rate (0.06 ms of transfer each)
        estimate.observe(600, 100, 10.1, 0.0)
    assert controller.choose(estimate, samples=8).probe


def test_on_a_slow_link_small_requests_show_the_rate_and_need_no_probe():
    estimate = _link(1 * MB, rtt_ms=10.0, server_ms=0.0)
    for _ in range(12):  # 700 bytes: 5.6 ms of transfer at 1 Mbit/s, plain to see
        estimate.observe(600, 100, 10.0 + 5.6, 0.0)
    assert estimate.rate_age == 0 and estimate.rate_bps == pytest.approx(1 * MB, rel=0.01)
    assert not _controller(50.0, probe_every=3).choose(estimate, samples=8).probe


def test_when_every_choice_is_small_it_never_probes():
    options = [Option(Choice(b, c), acc, b * s) for b, acc in ((32, 0.97), (2, 0.9)) for c, s in (("fp32", 64),)]
    controller = DeadlineController(options, 50.0, probe_every=2)
    estimate = LinkEstimate()
    estimate.observe_round_trip(5.0)
    for _ in range(6):  # one sample a request: every request is small, so the rate does not matter
        decision = controller.choose(estimate, samples=1)
        assert not decision.probe and decision.choice == Choice(32, "fp32")
        estimate.observe(2_300, 200, 6.0, 1.0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="deadline"):
        _controller(0.0)
    with pytest.raises(ValueError, match="margin"):
        _controller(10.0, margin=1.5)
    with pytest.raises(ValueError, match="max_bytes_per_s"):
        _controller(10.0, max_bytes_per_s=-1)
    with pytest.raises(ValueError, match="probe_every"):
        _controller(10.0, probe_every=0)
    with pytest.raises(ValueError):
        LinkEstimate(change_ratio=1.0)


EXIT_MANIFEST = {"models": [
    {**MANIFEST["models"][0], "exit": {"calibration": [  # budget 64's exit: on the device, 0.50 for every sample
        {"threshold": 0.0, "share": 1.0, "accuracy": 0.50}, {"threshold": 0.5, "share": 0.5, "accuracy": 0.58},
        {"threshold": 0.99, "share": 0.0, "accuracy": 0.60}]}},
    *MANIFEST["models"][1:]]}


@pytest.mark.parametrize("rate_mbps, rtt_ms, expected", [
    (100, 10.0, Choice(64, "fp32")),  # the network is fast: the best model, every sample to the server
    (1, 10.0, Choice(64, "fp32", exit=0.0)),  # only 2 channels fit (0.45): the exit alone is better (0.50)
    (100, 60.0, Choice(64, "fp32", exit=0.0)),  # no round trip fits in 50 ms: answer on the device or miss
])
def test_an_exit_is_chosen_when_it_is_the_most_accurate_way_to_meet_the_deadline(rate_mbps, rtt_ms, expected):
    options = options_from_manifest(EXIT_MANIFEST, exits=True)
    assert not any(o.choice.exit == 0.99 for o in options)  # a threshold nothing passes is the plain model
    controller = DeadlineController(options, 50.0, classes=10)
    decision = controller.choose(_link(rate_mbps * MB, rtt_ms=rtt_ms, server_ms=0.0), samples=8)
    assert decision.choice == expected and decision.meets


def test_an_exit_option_sends_only_the_share_that_does_not_exit():
    options = {o.choice: o for o in options_from_manifest(EXIT_MANIFEST, exits=True)}
    half = options[Choice(64, "fp16", exit=0.5)]
    assert half.bytes_per_sample == 64 * 128.0 * 0.5 and half.exit_share == 0.5
    controller = DeadlineController(list(options.values()), 50.0, classes=10)
    estimate = _link(10 * MB, rtt_ms=10.0, server_ms=0.0)
    assert controller.predict_ms(half, estimate, 8) == pytest.approx(
        estimate.predict_ms(256 + 8 * 64 * 128 // 2, 128 + 4 * 4 * 10))
    assert controller.predict_ms(options[Choice(64, "fp32", exit=0.0)], estimate, 8) == 0.0  # nothing is sent


def test_a_model_alone_is_judged_on_its_exits_calibration_images_where_there_are_some():
    entry = {**EXIT_MANIFEST["models"][0]}
    entry["exit"] = {**entry["exit"], "server_accuracy": 0.63}  # the calibration half, where the model did better
    manifest = {"models": [entry, *EXIT_MANIFEST["models"][1:]]}
    with_exits = {o.choice: o.accuracy for o in options_from_manifest(manifest, exits=True)}
    assert with_exits[Choice(64)] == 0.63 and with_exits[Choice(16)] == 0.55  # 16 has no exit: its test accuracy
    # Without exits among the options, the model is judged on the same images: one basis for every policy.
    assert {o.choice: o.accuracy for o in options_from_manifest(manifest)}[Choice(64)] == 0.63


def test_small_requests_chosen_for_a_slow_link_show_when_it_gets_faster():
    """At 5 Mbit/s the controller sends 1.5 KiB requests; when the link goes to 50, they must show it."""
    estimate = _link(5 * MB, rtt_ms=20.0)  # a large request or two measured the rate first
    _link(5 * MB, rtt_ms=20.0, nbytes=1500, requests=6, estimate=estimate)  # the small ones chosen then show it too
    assert estimate.rate_bps == pytest.approx(5 * MB, rel=0.05) and estimate.rate_age == 0
    for _ in range(4):  # the same requests on a link ten times faster
        estimate.observe(1500, 500, 20.0 + 8e3 * 2000 / (50 * MB), None)
    assert estimate.rate_bps > 20 * MB
