"""The one driver that streams a state dict tensor by tensor, for every method and stage.

θ0, the T fine-tuned checkpoints and the Fisher diagonals are opened lazily; for each
tensor name the driver reads that tensor from every input (never T full models), checks
it, hands it to the method and passes the result to a sink that writes as it goes. The
`basis` and `hessian` stages of the workflow use the same reading and checking.

Modules, by concern:

- `inputs`: which tensors are merged (`is_matrix_layer`), `MergeInputs` and the checks of
  inputs and settings before anything is computed;
- `reading`: parallel, checked reads of one tensor from every input into reused buffers;
- `subspaces`: where a layer's basis and curvature come from (computed, or the artifacts);
- `task_stats`: the statistics over whole tasks gathered first (TIES's streamed sums);
- `diagnostics`: `MergeReport`, the per-layer diagnostics and the recorded settings;
- `driver`: `merge` and `merge_sweep`;
- `stages`: the workflow's cached `basis` and `hessian` stages.
"""

from pipeline.merge.diagnostics import MergeReport, settings_dict
from pipeline.merge.diagnostics import _diagnostics as _diagnostics  # for the tests
from pipeline.merge.driver import MergeTarget, merge, merge_sweep
from pipeline.merge.inputs import (
    MergeInputs,
    check_inputs,
    check_settings,
    is_floating,
    is_matrix_layer,
)
from pipeline.merge.reading import (
    BufferPool,
    all_finite,
    iter_matrix_layers,
    read_deltas,
    read_fishers,
)
from pipeline.merge.stages import build_basis, build_hessian
from pipeline.merge.subspaces import (
    ComputedSubspace,
    StoredSubspace,
    SubspaceSource,
    read_basis,
    read_curvature,
)

__all__ = [
    "BufferPool",
    "ComputedSubspace",
    "MergeInputs",
    "MergeReport",
    "MergeTarget",
    "StoredSubspace",
    "SubspaceSource",
    "all_finite",
    "build_basis",
    "build_hessian",
    "check_inputs",
    "check_settings",
    "is_floating",
    "is_matrix_layer",
    "iter_matrix_layers",
    "merge",
    "merge_sweep",
    "read_basis",
    "read_curvature",
    "read_deltas",
    "read_fishers",
    "settings_dict",
]
