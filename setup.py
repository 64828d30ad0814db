"""Build configuration beyond pyproject.toml: the optional compiled TIES pass.

`pipeline.methods._ties_pass` is a small C extension (pipeline/methods/_ties_pass.c). It is
optional: without a C compiler the install goes on, and TIES runs its NumPy pass, which gives
the same bits more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pipeline.methods._ties_pass",
            ["pipeline/methods/_ties_pass.c"],
            # IEEE arithmetic as NumPy does it (no fused multiply-adds, no fast-math); no FP traps,
            # so the selects of the pass compile to vector blends.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-trapping-math"],
            optional=True,
        )
    ]
)
