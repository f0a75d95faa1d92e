"""What one cell measures: hypergradient-error studies, HPO, black-box baselines. Each
pipeline module has ``run(cell) -> PipelineResult``; commands that read the stored results
(report, regression gate, audit) are in :mod:`hypersweep.tools`.
"""
