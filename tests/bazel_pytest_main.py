"""Entry point of every Bazel `py_test`: runs one pytest file with the repository's conftest.py.

Bazel's native py_test executes a script; our tests are pytest modules, so each target runs this
file with the test module as its argument (see BUILD).
"""
import os
import sys

import pytest

if __name__ == "__main__":
  # Run from the source tree so that conftest.py, pytest.ini and gin/ resolve as in `make test`.
  workspace = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  os.chdir(workspace)
  sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
