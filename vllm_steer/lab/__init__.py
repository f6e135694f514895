"""Tooling around the runtime, fenced from it (no runtime module imports the lab): the
original notebook's method (the tests' oracle, the benchmarks' baseline), tiny random
checkpoints, a server launcher, the sweep, concept measurement and the demo model's training."""
