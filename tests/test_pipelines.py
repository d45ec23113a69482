"""The ready pipelines, the registry that finds them, the public API and the example script."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_rt
from sparse_rt.errors import ConfigError
from sparse_rt.model.sides import build_sides
from sparse_rt.pipeline import available_pipelines, get_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, cut_shape", [("digits_cnn", (32, 4, 4)), ("cifar_cnn", (64, 8, 8)),
                                             ("vgg11_cifar10", (128, 8, 8))])
def test_registered_pipelines_cut_where_documented(name, cut_shape):
    assert name in available_pipelines()
    pipeline = get_pipeline(name)
    torch.manual_seed(0)
    model = pipeline.build_model().eval()
    edge, server, cut = build_sides(model, pipeline.cut, pipeline.input_shape)
    assert (cut.channels, cut.height, cut.width) == cut_shape
    with torch.no_grad():
        edge.compressor.filter_logits.fill_(30.0)  # f = sigmoid(30) == 1.0 in float32: the filter fully open
    x = torch.randn(2, *pipeline.input_shape)
    edge.eval(), server.eval()
    torch.testing.assert_close(server(*edge(x)), model(x))  # B = C, open filter, same resolution: exact


@pytest.mark.parametrize("resolution", [0, 1, 2, 3])
async def test_vgg11_trains_and_infers_split_at_every_resolution(resolution):
    pipeline = get_pipeline("vgg11_cifar10")
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    async with sparse_rt.SplitPair(pipeline.build_model(), pipeline.cut, pipeline.input_shape, budget=16,
                                   resolution=resolution, codec="int8") as pair:
        loss = await pair.train_step(x, y)
        logits = await pair.infer(x)
    assert loss > 0 and logits.shape == (4, 10)
    assert pair.cut.sent_height == (8 if resolution <= 1 else {2: 5, 3: 4}[resolution])


def test_pipelines_are_found_by_name_or_module_attribute():
    assert get_pipeline("pipelines.digits_cnn:pipeline") is get_pipeline("digits_cnn")
    with pytest.raises(ConfigError, match="available: cifar_cnn, digits_cnn, vgg11_cifar10"):
        get_pipeline("resnet_imaginary")
    with pytest.raises(ConfigError, match="not a sparse_rt.Pipeline"):
        get_pipeline("pipelines.digits_cnn:build_model")
    with pytest.raises(ConfigError, match="cannot load pipeline"):
        get_pipeline("no_such_module:pipeline")


def test_public_api_names_all_resolve():
    for name in sparse_rt.__all__:
        assert getattr(sparse_rt, name) is not None
    with pytest.raises(AttributeError):
        sparse_rt.not_a_name


def test_example_splits_a_torchvision_model_and_runs_a_step_and_an_inference():
    done = subprocess.run([sys.executable, str(REPO / "examples" / "split_torchvision.py"), "--model",
                           "mobilenet_v3_small", "--cut", "features.3", "--budget", "8", "--codec", "int8"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "8 of 24 channels sent as int8" in done.stdout
    assert "training step loss" in done.stdout and "bytes up" in done.stdout
