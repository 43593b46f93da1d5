"""Benchmarks of n2a against diffusers (the optional `bench` extra): see benchmarks/README.md.

Run them all with `python -m benchmarks.run [--quick]`; each module also runs alone
(`python -m benchmarks.train`, ...) and prints one JSON object after a short table.
"""
