import importlib.metadata

import ann2snn_fx


def test_version_matches_metadata() -> None:
    assert ann2snn_fx.__version__ == importlib.metadata.version("ann2snn-fx")
