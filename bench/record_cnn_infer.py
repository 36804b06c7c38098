"""CNN inference with variable batch sizes (a small ResNet-style network, no_grad)."""

import torch
import torch.nn as nn

from record_common import record


def block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def workload():
    net = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), block(32, 64, 2), block(64, 128, 2), block(128, 192, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(192, 100)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(30):
            batch = int(torch.randint(1, 33, (1,), generator=g))  # requests arrive in batches of 1..32
            x = torch.randn(batch, 3, 64, 64, generator=g)
            net(x).softmax(-1).argmax(-1)


if __name__ == "__main__":
    record("cnn_infer", workload, __doc__, model="4-stage convnet, 64x64 images, batch 1..32, 30 batches")
