"""PruneTrain (Lym et al., SC'19): train with a group lasso over channel groups and shrink
the model every few epochs, so that the rest of training is cheaper.

    lasso.py     GroupLasso: sum over channels of the L2 norm of every weight writing or reading it
    fold.py      fold the constants of dead-but-biased channels into their consumers
    branches.py  remove residual branches whose every channel is dead
    shrink.py    one reconfiguration step: mask from zeros, fold, remove branches, reconfigure
    callback.py  PruneTrain: the periodic step for a training loop, with its history
    batch.py     DynamicBatch: grow the mini-batch into the memory the model freed
    reinit.py    reinit: train the final architecture from scratch (Liu et al. 2019)

See docs/prunetrain.md.
"""

from prunefx.train.batch import BatchDecision, DynamicBatch, activation_bytes_per_sample
from prunefx.train.branches import BranchReport, remove_starved
from prunefx.train.callback import PruneTrain, Reconfiguration
from prunefx.train.fold import Fold, FoldReport, fold_constants
from prunefx.train.lasso import GroupLasso
from prunefx.train.reinit import ReinitReport, reinit
from prunefx.train.shrink import ShrinkReport, shrink

__all__ = [
    "PruneTrain", "Reconfiguration", "GroupLasso", "shrink", "ShrinkReport",
    "fold_constants", "Fold", "FoldReport", "remove_starved", "BranchReport",
    "DynamicBatch", "BatchDecision", "activation_bytes_per_sample", "reinit", "ReinitReport",
]
