"""ann2snn-ops installed alone, as a transformer project would: torch is its only dependency."""

import importlib.metadata
import importlib.util

import pytest

import ann2snn_ops


@pytest.mark.parametrize("absent", ["requests", "tqdm", "ann2snn_calib", "ann2snn_fx", "ann2snn_utils"])
def test_nothing_else_is_installed(absent: str) -> None:
    assert importlib.util.find_spec(absent) is None, f"{absent} leaked into the ops-only install"


def test_declares_torch_only() -> None:
    requires = importlib.metadata.requires("ann2snn-ops") or []
    names = {
        r.split(";")[0].split(">")[0].split("<")[0].split("=")[0].split("~")[0].strip() for r in requires
    }
    assert names == {"torch"}


def test_installed_from_a_wheel_not_the_tree() -> None:
    assert "site-packages" in (ann2snn_ops.__file__ or "")
