"""The stages, one module each, in pipeline order: `prepare`, `train`, `fit`, `unlearn`, `report`, `query`
(reading the fitted attributions), and `run` (the whole, in order); `status` reports every stage's state.
What the stages of a config are (identities, stage references, family specs) is `pipeline.plan`, a layer
below, since store maintenance and `pipeline.evaluate.oracles` read it too.

Nothing is re-exported here, so importing one stage does not import the others (or Ray, or torch).
"""
