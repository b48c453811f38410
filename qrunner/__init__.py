"""qrunner: run a VPOP3-style Lua policy over a Postfix or Exim queue.

The pipeline (list, decide, plan, execute, record) is spread over one module
per job; start reading at :mod:`qrunner.cli`.
"""

__version__ = "0.1.0"
