"""An app with the head of a trained model inside: it asks a running sparse-rt server for the rest.

Start a server and train a head first (see README.md, "Run nodes"), then:

    python examples/embed_head.py [--connect tcp://127.0.0.1:5555] [--head runs/digits/head.pt]
"""
import argparse

import torch
from sklearn.datasets import load_digits

from sparse_rt import SyncEdgeClient

parser = argparse.ArgumentParser(description="Classify handwritten digits with a split model.")
parser.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the server's address")
parser.add_argument("--head", default="runs/digits/head.pt", help="the trained head (an edge checkpoint)")
args = parser.parse_args()

digits = load_digits()
images = torch.tensor(digits.images[-64:] / 16, dtype=torch.float32).unsqueeze(1)  # 64 digits, 1x8x8 each
labels = torch.tensor(digits.target[-64:])

with SyncEdgeClient("digits_cnn", args.connect, head_checkpoint=args.head) as edge:
    predictions = edge.infer(images).argmax(dim=1)  # head here, tail on the server

print("predicted:", predictions[:16].tolist())
print("actual:   ", labels[:16].tolist())
print(f"accuracy on {len(labels)} digits: {(predictions == labels).float().mean():.3f}")
