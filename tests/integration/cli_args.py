"""Flags that pipeline tests add to `sempart label` when their point is plumbing.

Each inference actor is a fresh process that imports torch and timm and loads the model,
seconds of CPU: more than labelling a test's few images costs.
Tests of several actors at once (the run killed before a resume, faults, node loss,
actor defaults) keep the default, one actor per CPU.
"""

ONE_ACTOR = ("--actors", "1")
