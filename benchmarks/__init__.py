"""Benchmarks of n2a against diffusers (the optional `bench` extra): see benchmarks/README.md.

Run them all with `python benchmarks/run.py [--quick]`; each module also runs alone
(`python benchmarks/train.py`, ...) and prints one JSON object after a short table.
"""
