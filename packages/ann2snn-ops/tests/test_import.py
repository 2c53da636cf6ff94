import importlib.metadata

import ann2snn_ops


def test_version_matches_metadata() -> None:
    assert ann2snn_ops.__version__ == importlib.metadata.version("ann2snn-ops")
