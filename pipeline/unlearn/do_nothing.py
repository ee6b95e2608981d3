"""do_nothing: the full model as it is (the upper end of KLoM on the forget set)."""

from pipeline.unlearn.base import MethodConfig, MethodOutput

NEEDS = ()


class Config(MethodConfig):
    pass


def run(ctx, model, forget, retain, cfg: Config, meter) -> MethodOutput:
    return MethodOutput(model=model)
