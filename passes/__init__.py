"""Rewrite passes: from a pruning plan to a dense, smaller GraphModule.

Each pass is a small frozen dataclass with a ``run(state)`` method, in its own file with the
rule it implements in the module docstring. The pipeline is explicit::

    DEFAULT_PIPELINE = Pipeline([
        SliceTensors(),      # new parameters/buffers: kept indices of every pruned dim
        RebuildModules(),    # copies of called modules holding them, attributes updated
        FixShapeArgs(),      # view sizes, split sizes, slice bounds, groups, normalized_shape
        FreezeStaleSizes(),  # x.shape[1] used as a number keeps its original value
        CheckSizes(),        # every view/reshape/expand size evaluates to the planned shape
        EliminateDeadCode(), # nodes left without users (in-place ops kept)
        Assemble(),          # GraphModule with the original submodule names; lint; recompile
        RecordLayout(),      # which channels of the original model the result keeps
    ])
"""

from prunefx.passes.assemble import Assemble
from prunefx.passes.base import Pass, Pipeline, RewriteState
from prunefx.passes.check_sizes import CheckSizes
from prunefx.passes.dead_code import EliminateDeadCode
from prunefx.passes.fix_shape_args import FixShapeArgs
from prunefx.passes.rebuild_modules import RebuildModules
from prunefx.passes.record_layout import RecordLayout
from prunefx.passes.size_values import FreezeStaleSizes
from prunefx.passes.slice_tensors import SliceTensors

__all__ = [
    "Pass", "Pipeline", "RewriteState", "SliceTensors", "RebuildModules", "FixShapeArgs", "FreezeStaleSizes",
    "CheckSizes", "EliminateDeadCode", "Assemble", "RecordLayout", "DEFAULT_PIPELINE",
]

DEFAULT_PIPELINE = Pipeline(
    (SliceTensors(), RebuildModules(), FixShapeArgs(), FreezeStaleSizes(), CheckSizes(), EliminateDeadCode(), Assemble(),
     RecordLayout())
)
