"""Build configuration beyond pyproject.toml: the optional compiled merge passes.

`pipeline.methods._passes` is a small C extension (pipeline/methods/_passes.c) with the
per-task TIES pass and the Fisher-weighted average. It is optional: without a C compiler the
install goes on, and those methods run their NumPy passes, which give the same bits more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pipeline.methods._passes",
            ["pipeline/methods/_passes.c"],
            # IEEE arithmetic as NumPy does it (no fused multiply-adds, no fast-math); no FP traps,
            # so the selects of the passes compile to vector blends.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math"],
            optional=True,
        )
    ]
)
