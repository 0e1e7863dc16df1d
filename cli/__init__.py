"""Command-line entry points (`mf-generate`, `mf-build-engines`, `mf-bench`, `mf-tokens`), the top layer:
argparse lives here and nowhere below."""
