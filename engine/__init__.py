"""Engines: the backend interface and registry, builds into a content-addressed cache, and the runners that
open them behind the `Networks` interface the runtime calls."""
