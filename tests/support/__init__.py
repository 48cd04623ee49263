"""Helpers that tests share: servers, ports, paths, a running pipeline, sink receivers, deploy files.

Tests import helpers from here, never from another test module or a conftest: a test module holds its own
tests and nothing others depend on, and conftest.py files hold fixtures only.
"""
