"""Engines: one interface over the torch modules and built backends (uses `megafusion.export`)."""
