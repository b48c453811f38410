"""Shared test setup: the Postfix fixtures (tests/postfix_fixtures.py) for every test module."""

pytest_plugins = ["postfix_fixtures"]
