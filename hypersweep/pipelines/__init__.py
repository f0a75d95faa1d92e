"""What is measured and shown: hypergradient-error studies, HPO, black-box baselines,
regression benchmarks and reports. Each pipeline module has ``run(cell) -> PipelineResult``.
"""
