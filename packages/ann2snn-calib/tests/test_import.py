import importlib.metadata

import ann2snn_calib


def test_version_matches_metadata() -> None:
    assert ann2snn_calib.__version__ == importlib.metadata.version("ann2snn-calib")
