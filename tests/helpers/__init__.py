"""Helpers shared by tests in more than one package of tests/.

Tests import helper modules (this package, tests/ports.py, tests/waiting.py, or a
package's own helpers such as tests/cluster/harness.py), never a test module or a
conftest: tests/test_suite_rules.py checks it.
"""
