"""split_model: the split model must equal the whole model, and bad cuts must say why."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from sparse_rt.errors import SplitError
from sparse_rt.model.split import cut_points, split_model

# Small inputs keep the file fast; 32x32 still goes through every stage of these models.
IMAGES = (2, 3, 32, 32)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "sequential":
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    return getattr(torchvision.models, name)(weights=None, num_classes=10)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-2 tensors gain nothing from intra-op threads; on a busy 2-core machine the
    thread hand-offs made this file's forwards 10-40x slower and its run time erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """One instance per architecture for the whole file: vgg11_bn alone has 128M parameters."""
    return {name: _build(name).eval() for name in ("sequential", "vgg11_bn", "resnet18", "mobilenet_v3_small")}


def _input(name: str) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 8) if name == "sequential" else torch.randn(IMAGES)


@pytest.mark.parametrize(
    "name, at",
    [
        ("sequential", "0"),
        ("sequential", "1"),
        ("sequential", "3"),
        ("vgg11_bn", "features.7"),
        ("vgg11_bn", "features.14"),
        ("vgg11_bn", "avgpool"),
        ("resnet18", "maxpool"),
        ("resnet18", "layer1"),
        ("resnet18", "layer2"),
        ("resnet18", "layer3"),
        ("resnet18", "layer4.0"),
        ("mobilenet_v3_small", "features.0"),
        ("mobilenet_v3_small", "features.3"),
        ("mobilenet_v3_small", "features.8"),
        ("mobilenet_v3_small", "features"),
    ],
)
def test_split_equals_whole(models: dict[str, nn.Module], name: str, at: str) -> None:
    model, x = models[name], _input(name)
    split = split_model(model, at)
    assert split.cut == at
    with torch.no_grad():
        torch.testing.assert_close(split.tail(split.head(x)), model(x))


@pytest.mark.parametrize("name, depth", [("resnet18", 3), ("mobilenet_v3_small", 2)])
def test_every_cut_point_splits_exactly(models: dict[str, nn.Module], name: str, depth: int) -> None:
    """All cut points up to `depth` levels deep (mobilenet has 85 in all; the deep ones repeat)."""
    model, x = models[name], _input(name)
    with torch.no_grad():
        expected = model(x)
        for at in (p for p in cut_points(model) if p.count(".") < depth):
            split = split_model(model, at)
            torch.testing.assert_close(split.tail(split.head(x)), expected, msg=lambda m: f"cut at {at}: {m}")


def test_head_output_is_the_layer_output(models: dict[str, nn.Module]) -> None:
    model, x = models["resnet18"], _input("resnet18")
    head = split_model(model, "layer2").head
    seen = {}
    hook = model.layer2.register_forward_hook(lambda mod, args, out: seen.update(out=out))
    try:
        with torch.no_grad():
            model(x)
            head_out = head(x)
    finally:
        hook.remove()
    assert head_out.shape == (2, 128, 4, 4)
    torch.testing.assert_close(head_out, seen["out"])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_train_mode_gradients_match_whole_model(name: str) -> None:
    """BatchNorm batch statistics and Dropout masks must behave as in the whole model."""
    model, x = _build(name).train(), _input(name)
    split = split_model(model, "layer2" if name == "resnet18" else "features.3")

    def grads(forward) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(2)  # same Dropout mask in both passes
        forward(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    whole = grads(model)
    parts = grads(lambda t: split.tail(split.head(t)))
    assert whole.keys() == parts.keys()
    for n in whole:
        torch.testing.assert_close(parts[n], whole[n], msg=lambda m: f"grad of {n}: {m}")


def test_eval_and_train_reach_the_shared_layers() -> None:
    model = _build("resnet18").train()
    split = split_model(model, "layer2")
    split.head.eval()
    split.tail.eval()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    split.head.train()
    assert model.layer1[0].bn1.training


def test_halves_share_parameters_with_the_model(models: dict[str, nn.Module]) -> None:
    model = models["resnet18"]
    split = split_model(model, "layer2")
    owned = {id(p) for p in model.parameters()}
    head, tail = list(split.head.parameters()), list(split.tail.parameters())
    assert all(id(p) in owned for p in head + tail)
    assert {id(p) for p in head} | {id(p) for p in tail} == owned
    assert not {id(p) for p in head} & {id(p) for p in tail}
    assert split.head.conv1.weight.data_ptr() == model.conv1.weight.data_ptr()
    assert split.tail.fc.weight is model.fc.weight


def test_parameters_and_constants_on_both_sides_of_the_cut() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.full((4,), 2.0))

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            x = self.a(x * self.scale + y.sum())
            return self.b(x) + self.scale + torch.tensor([1.0, 2.0, 3.0, 4.0])

    model, x, y = Scaled(), torch.randn(2, 4), torch.randn(2, 4)
    attributes = set(vars(model))
    split = split_model(model, "a")
    torch.testing.assert_close(split.tail(split.head(x, y)), model(x, y))
    assert split.head.scale is model.scale and split.tail.scale is model.scale
    assert set(vars(model)) == attributes  # fx's _tensor_constant0 stays with the tail


def test_unknown_name_lists_valid_cut_points(models: dict[str, nn.Module]) -> None:
    with pytest.raises(SplitError, match=r"'layer9' is not a layer of ResNet") as info:
        split_model(models["resnet18"], "layer9")
    for valid in ("conv1", "maxpool", "layer1", "layer2", "layer3", "avgpool"):
        assert valid in str(info.value)


def test_cut_inside_residual_block_explains_the_skip(models: dict[str, nn.Module]) -> None:
    with pytest.raises(SplitError, match=r"send 2 tensors") as info:
        split_model(models["resnet18"], "layer2.0.conv1")
    assert "'layer1' (before)" in str(info.value)
    assert "'layer2.0' (after)" in str(info.value)


def test_input_used_after_the_cut_is_refused() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)) + x

    with pytest.raises(SplitError, match=r"2 tensors \(x, a\)"):
        split_model(Skip(), "a")
    assert cut_points(Skip()) == []  # after `b` only the final add is left


@pytest.mark.parametrize("name, at", [("resnet18", "fc"), ("sequential", "4"), ("mobilenet_v3_small", "classifier")])
def test_cut_at_the_last_layer_is_refused(models: dict[str, nn.Module], name: str, at: str) -> None:
    with pytest.raises(SplitError, match=r"last layer .* leaves nothing for the tail"):
        split_model(models[name], at)


def test_root_is_not_a_cut_point(models: dict[str, nn.Module]) -> None:
    with pytest.raises(SplitError, match=r"'' is the whole model"):
        split_model(models["sequential"], "")


def test_untraceable_model_is_explained() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a(x)
            return self.b(x) if x.sum() > 0 else x

    with pytest.raises(SplitError, match=r"symbolically") as info:
        split_model(DataDependent(), "a")
    assert info.value.__cause__ is not None


def test_cut_points_resnet18(models: dict[str, nn.Module]) -> None:
    points = cut_points(models["resnet18"])
    assert "layer2" in points
    assert "layer2.0.conv1" not in points
    assert "fc" not in points and "" not in points
    assert points[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert points.index("layer1") < points.index("layer2") < points.index("layer3") < points.index("avgpool")


def test_cut_points_place_a_reused_layer_at_its_last_call() -> None:
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act, self.out = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.lin(self.act(self.lin(x))))

    model = Reuse().eval()
    assert cut_points(model) == ["act", "lin"]
    split, x = split_model(model, "lin"), torch.randn(2, 4)
    torch.testing.assert_close(split.tail(split.head(x)), model(x))
    assert list(split.tail.graph.nodes)[1].target == "out"


def test_sequential_cut_points_in_order(models: dict[str, nn.Module]) -> None:
    assert cut_points(models["sequential"]) == ["0", "1", "2", "3"]
