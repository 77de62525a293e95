"""The quality harness: labelled cases replayed through the real stages, scored without
a model as judge (``ai-sysadmin eval``, docs/quality.md).

``templates``: the message templates of the line corpus, with their labels and split.
``corpus``: the labelled journald lines generated from them (deterministic).
``scenarios``: incident scenarios (journal excerpt, failed units, metrics, recorded
read-only action outputs, ground truth), one directory each under ``scenarios/``.
``floors``: the cheap baselines a model has to beat.
``scoring``: the deterministic scores (pure functions).
``runner``: drives the pipeline's own stage classes on the configured layers.
``table``: the printed report.
"""
