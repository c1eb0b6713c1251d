"""pytest configuration shared by every test.

* `slow` tests run only with `--run-slow` (or MMV_TF_RUN_SLOW=1): `make test-slow`.
* TensorFlow sees 2 logical CPU devices, so MirroredStrategy tests exercise real cross-replica code.
  This must happen before any TF op runs, hence here and not in a fixture.
* gin state is cleared after every test.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes minutes; run with --run-slow")
  import tensorflow as tf
  cpus = tf.config.list_physical_devices("CPU")
  try:
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
  except RuntimeError:  # already initialised by an earlier import in this process
    pass


def pytest_collection_modifyitems(config, items):
  if config.getoption("--run-slow") or os.environ.get("MMV_TF_RUN_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow: run with --run-slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clear_gin():
  yield
  import gin
  gin.clear_config()
