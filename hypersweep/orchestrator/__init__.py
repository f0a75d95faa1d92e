"""Where and when cells run: the study (``spec``, ``fields``, ``checks``), its cells
(``expand``, ``cell``), the Ray actors (``actors``, ``resources``, ``ray_env``) and the
driver (``driver``: the loop; ``pool``, ``feed``, ``sinks``, ``summary``, ``progress``).

Results go through :mod:`hypersweep.io`.

Nothing in this package imports torch or jax (a test checks it in a subprocess).
"""
