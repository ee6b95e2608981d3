"""The training recipe: `pipeline.training.recipe` (a block of M models trained as one stacked computation)
and `pipeline.training.optim` (the stacked optimizers it and the unlearning methods use). No paths, no Ray.

Nothing is re-exported here, so each module is named where it is used.
"""
