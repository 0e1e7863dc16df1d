"""Where one mf-generate process spends its time: cProfile of `megafusion.cli.generate.main(ARGS)` in this process,
imports included (#15's compiled warm start: the graph-capture phase of a process whose compiled functions all load).
`python3 benchmarks/lab/warm_profile.py --output DIR [--hide-peft] -- ARGS...` writes DIR/NAME.prof and DIR/NAME.txt
(the 60 costliest calls by cumulative and by own time) and prints the wall time.

--hide-peft makes `import peft` fail before diffusers is imported, so diffusers takes peft as absent: megafusion
never calls peft (core/lora.py fuses LoRAs itself), yet diffusers imports it with every model class (5.9 s of a
first SDXL load on the H200, benchmarks/lab/load_profile.py). An experiment, not a product switch."""
import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--name", default="warm")
    p.add_argument("--hide-peft", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then mf-generate's arguments")
    args = p.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.hide_peft:
        sys.modules["peft"] = None  # importlib.util.find_spec('peft') is then None: diffusers' is_peft_available()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prof = cProfile.Profile()

    def run() -> int:
        from megafusion.cli.generate import main as generate

        return generate(rest)

    rc = prof.runcall(run)
    wall = time.perf_counter() - t0
    prof.dump_stats(out / f"{args.name}.prof")
    text = io.StringIO()
    text.write(f"mf-generate {' '.join(rest)}: exit {rc}, {wall:.2f} s in this process (profiled)\n")
    for key in ("cumulative", "tottime"):
        pstats.Stats(prof, stream=text).sort_stats(key).print_stats(60)
    (out / f"{args.name}.txt").write_text(text.getvalue())
    print(f"{args.name}: exit {rc}, {wall:.2f} s")


if __name__ == "__main__":
    main()
