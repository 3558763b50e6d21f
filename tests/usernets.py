"""A user's own 3D network, importable as ``usernets:TinyNet`` (tests put this folder on sys.path)."""
from torch import nn


class TinyNet(nn.Module):
    """conv-norm-relu-pool twice, global pooling, linear: a typical small classifier."""

    def __init__(self, width=4, n_classes=2, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU())
        self.down = nn.MaxPool3d(2)
        self.body = nn.Sequential(nn.Conv3d(width, 2 * width, 3, padding=1), nn.BatchNorm3d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x):
        x = self.body(self.down(self.stem(x)))
        return self.head(self.pool(x).flatten(1))
