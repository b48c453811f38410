"""MTA back ends: everything that knows Postfix or Exim lives below here.

Each back end implements :class:`qrunner.mta.base.Backend`; the offline
snapshot reader is one too, so ``plan --queue-file`` follows the same path
as a live run.
"""
