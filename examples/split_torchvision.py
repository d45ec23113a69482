"""Split a torchvision model, then run one split training step and one split inference.

The head and the tail talk through a real ZeroMQ socket; only the learned
``--budget`` best channels at the cut cross it.

    python examples/split_torchvision.py                      # resnet18 cut after layer2
    python examples/split_torchvision.py --model mobilenet_v3_small --cut features.3 --budget 8
"""
import argparse
import asyncio

import torch
import torchvision

import sparse_rt


async def main(model_name: str, cut: str, budget: int, codec: str) -> None:
    model = torchvision.models.get_model(model_name, weights=None, num_classes=10)
    images, labels = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))

    async with sparse_rt.SplitPair(model, cut, (3, 64, 64), budget=budget, codec=codec) as pair:
        loss = await pair.train_step(images, labels)  # activations up, gradients down
        logits = await pair.infer(images)  # activations up, predictions down

    channels = pair.cut.channels
    print(f"{model_name} cut after '{cut}': {budget} of {channels} channels sent as {codec}")
    print(f"training step loss {loss:.4f}; predictions {logits.argmax(dim=1).tolist()}")
    print(f"bytes up {pair.traffic.bytes_sent}, bytes down {pair.traffic.bytes_received}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="any torchvision classification model name")
    parser.add_argument("--cut", default="layer2", help="layer to cut after (see sparse_rt.cut_points(model))")
    parser.add_argument("--budget", type=int, default=32, help="channels sent per sample")
    parser.add_argument("--codec", default="fp16", choices=["fp32", "fp16", "int8"])
    args = parser.parse_args()
    asyncio.run(main(args.model, args.cut, args.budget, args.codec))
