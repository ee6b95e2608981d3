"""do_nothing: the full model as it is (the upper end of KLoM on the forget set)."""

from pipeline.unlearn.base import MethodOutput
from pipeline.unlearn.hparams import NEEDS as _NEEDS, DoNothing as Config  # torch-free: see hparams.py

NEEDS = _NEEDS["do_nothing"]


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    return MethodOutput(model=model)
