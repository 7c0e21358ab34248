"""prunefx inside the training frameworks people use.

    lightning.py   PruneTrainCallback: PruneTrain inside ``lightning.pytorch.Trainer.fit``

Each module imports its framework; importing ``prunefx.integrations`` imports none of them.
See docs/integrations.md.
"""

__all__: list[str] = []
