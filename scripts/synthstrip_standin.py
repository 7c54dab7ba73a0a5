"""Write a stand-in ``synthstrip.1.pt``: nipreps-synthstrip's StripModel, loadable as FreeSurfer's file.

For container checks where FreeSurfer's weights cannot be fetched (no image registry) and must not be
redistributed. The file has the format SynthStrip's loaders read (``torch.load(...)["model_state_dict"]``,
tensors only, so ``weights_only=True`` loads it) and every tensor of StripModel. Its weights are random
(seeded), except for one path: SynthStrip with purely random weights predicts a distance map that is
below the 1 mm border everywhere, i.e. a mask of the whole volume. So the first encoder convolutions
carry the normalised intensity through on channel 0, the full-resolution convolutions after the last
skip connection read only that channel and smooth it (3x3x3 means), and the last convolution gives
``sdt = OFFSET - GAIN * smoothed intensity``: the "brain" is where the smoothed intensity exceeds
``(OFFSET - 1) / GAIN`` of the 99th percentile, a head mask rather than a brain mask. Not a skull
stripper: it exists so that the SynthStrip code path (loading, conforming, resampling, masking) runs.

    python scripts/synthstrip_standin.py OUT.pt [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

OFFSET = 6.0
GAIN = 12.5  # inside where the smoothed, 99th-percentile-scaled intensity > (6 - 1) / 12.5 = 0.4


def standin_state_dict(seed: int = 0) -> dict:
    """StripModel's state dict: random, with the intensity path described in the module docstring."""
    import torch
    from nipreps.synthstrip.model import StripModel

    torch.manual_seed(seed)
    model = StripModel()
    with torch.no_grad():
        first, second = model.encoder[0][0].conv, model.encoder[0][1].conv
        for conv in (first, second):  # channel 0 = the input, unchanged (LeakyReLU keeps x >= 0)
            conv.weight[0].zero_()
            conv.weight[0, 0, 1, 1, 1] = 1.0
            conv.bias[0] = 0.0
        remaining = [block.conv for block in model.remaining]
        # After the last skip connection the input's channels are [decoder output, encoder level 0];
        # channel 0 of encoder level 0 is the intensity.
        skip_channel = remaining[0].in_channels - second.out_channels
        for i, conv in enumerate(remaining):
            conv.weight.zero_()
            conv.bias.zero_()
            src = skip_channel if i == 0 else 0
            conv.weight[0, src] = 1.0 / 27.0
        last = remaining[-1]
        last.weight[0, 0] = -GAIN / 27.0
        last.bias[0] = OFFSET
    return {"model_state_dict": model.state_dict()}


def write_standin(path: Path, seed: int = 0) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(standin_state_dict(seed), str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_standin(args.out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
