"""Whether the MTA tests run here, skip, or must fail: one rule for Postfix and Exim.

Run by hand without the MTA (or without root), an MTA test skips with the
reason. With ``QRUNNER_REQUIRE_MTA=1`` (CI, ``make test`` as root, where the
project's own setup installed the MTAs) it fails instead, so that a broken
setup cannot pass as "all skipped".
"""

from __future__ import annotations

import os
from typing import Optional

import pytest

REQUIRE_MTA_ENV = "QRUNNER_REQUIRE_MTA"


def mta_required() -> bool:
    """True when the environment says MTA tests must run, not skip."""
    return os.environ.get(REQUIRE_MTA_ENV, "").strip() == "1"


def skip_or_fail(reason: Optional[str]) -> None:
    """Nothing when ``reason`` is None; else skip with it, or fail under QRUNNER_REQUIRE_MTA=1."""
    if reason is None:
        return
    if mta_required():
        pytest.fail("%s=1 but %s" % (REQUIRE_MTA_ENV, reason), pytrace=False)
    pytest.skip(reason)
