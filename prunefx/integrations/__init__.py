"""prunefx inside the training frameworks people use.

    lightning.py              PruneTrainCallback: PruneTrain inside ``lightning.pytorch.Trainer.fit``
    transformers_trainer.py   PruneTrainCallback: PruneTrain inside ``transformers.Trainer.train``
                              (the Trainer's model object becomes the smaller model at each shrink)

Each module imports its framework; importing ``prunefx.integrations`` imports none of them.
See docs/integrations.md.
"""

__all__: list[str] = []
