"""The MegaFusion runtime: schedule, stage loop, truncate and relay, `mf-generate`."""
