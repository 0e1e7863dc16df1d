import json, torch, time
from megafusion.core.loading import load_model
from megafusion.core.plan import default_plan
from megafusion.engine.load import open_engines
from megafusion.runtime.pipeline import MegaFusionPipeline, GenerationOptions
from megafusion.benchmarks.variants import direct_plan
from megafusion.benchmarks.timing import measure
dev = torch.device("cuda")
b = load_model("sdxl", None, True, False, seed=0)  # CPU fp32, as mf-generate loads it for engines
plan = default_plan(b.family, 2048, 2048); d = direct_plan(b.family, plan)
opts = GenerationOptions("a photograph of an astronaut riding a horse")
out = {}
for name, p, dil in (("engines:aoti", plan, 2), ("direct (engines:aoti)", d, 1)):
    nets, desc = open_engines("/tmp/mf-aoti-sdxl", b, p, dil, "pixel", dev, "aoti")
    pipe = MegaFusionPipeline.fast(b, nets, dev)
    m = measure(lambda: pipe.generate(p, opts).timings, dev, 3, 1)
    out[name] = {"plan": p.describe(), "totals_s": m.totals_s, "median_s": m.median_s, "first_s": m.first_s,
                 "first_peak_gib": [x / 2**30 for x in m.first_peak], "steady_peak_gib": [x / 2**30 for x in m.steady_peak],
                 "segments": m.segment_medians(), "graphed": pipe.graphs is not None,
                 "captures": getattr(pipe.graphs, "captures", None), "replays": getattr(pipe.graphs, "replays", None)}
    print(name, json.dumps(out[name]), flush=True)
    del pipe, nets; torch.cuda.empty_cache()
json.dump(out, open("sdxl-engines-inline.json", "w"), indent=1)
