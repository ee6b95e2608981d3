"""Evaluation metrics.

``pipeline.evaluate.klom``: KLoM, its P95 summary and bootstrap interval.
``pipeline.evaluate.metrics``: accuracy, loss from margins, membership-inference balanced accuracy.

Nothing is re-exported here, so ``pipeline.evaluate.klom`` always names the module, not the
function.
"""
