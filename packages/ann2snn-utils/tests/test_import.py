import importlib.metadata

import ann2snn_utils


def test_version_matches_metadata() -> None:
    assert ann2snn_utils.__version__ == importlib.metadata.version("ann2snn-utils")
