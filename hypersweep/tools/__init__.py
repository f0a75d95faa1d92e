"""Commands that read stored results: ``report`` (figures, tables, HTML), ``regression``
(the gate against a committed baseline) and ``audit`` (re-verify a sample of cells).

Per-cell work lives in :mod:`hypersweep.pipelines`; nothing here runs inside an actor.
"""
