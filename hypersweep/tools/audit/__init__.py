"""``hypersweep audit``: re-verify a sample of a study's stored results in a fresh process.
:mod:`.checks` (what must match, and how closely), :mod:`.worker` (the fresh process),
:mod:`.main` (sampling, the audit and the command)."""
