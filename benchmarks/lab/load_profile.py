"""Where the compiled path's model-load phase goes: cProfile of building a random-weight model on a device.
`python3 benchmarks/lab/load_profile.py --model sdxl --device cuda` prints the 40 costliest calls (cumulative)."""
import argparse
import cProfile
import pstats
import time

import torch

from megafusion.core.loading import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="sdxl")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        torch.cuda.init()
    t0 = time.perf_counter()
    prof = cProfile.Profile()
    prof.runcall(load_model, args.model, random_weights=True, device=args.device, dtype=torch.float16)
    print(f"load_model {args.model} on {args.device}: {time.perf_counter() - t0:.2f} s")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
