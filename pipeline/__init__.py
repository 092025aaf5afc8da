"""sempart's distributed side: Ray Data labelling, Ray Train training, storage, query, export.

`from pipeline import Labeler` gives the labelling stage for Ray Data pipelines of your
own (pipeline/labeler.py); it is imported on first use, so that the command line and
the CPU workers do not load what they do not need.
"""


def __getattr__(name: str):
    if name == "Labeler":
        from pipeline.labeler import Labeler

        return Labeler
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["Labeler"]
