"""What the tests share: builders, tiny data sets, hand-written references and run helpers, as plain modules.

A test module imports from here (and takes fixtures from tests/conftest.py), never from another test module:
tests/test_layout.py fails where one does. Nothing here is a test.
"""
