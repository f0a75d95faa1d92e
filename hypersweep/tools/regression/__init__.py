"""``hypersweep regress``: the regression gate. :mod:`.rules` (cell-by-cell comparison),
:mod:`.markdown` (the report), :mod:`.suite` (the suite and the baseline file),
:mod:`.main` (the command)."""
