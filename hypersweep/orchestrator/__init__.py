"""Where and when cells run: study specs, cells, Ray actors and the driver.

Results go through :mod:`hypersweep.io`.

Nothing in this package imports torch or jax (a test checks it in a subprocess).
"""
