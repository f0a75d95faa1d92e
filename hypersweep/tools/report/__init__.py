"""``hypersweep report``: figures, tables and one HTML page from study outputs.

:mod:`.reading` (output directories -> DataFrames), :mod:`.statistics` (curves, rates,
contraction factors), :mod:`.figures` (matplotlib), :mod:`.tables` (comparison and summary
tables), :mod:`.page` (the HTML page), :mod:`.main` (the command and its MLflow logging).
"""
