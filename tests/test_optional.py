"""Optional dependencies: a missing extra gives an error that names it."""
import sys

import numpy as np
import pytest

from keras_clip.evaluation import report
from keras_clip.evaluation.linear_probe import LogisticRegression
from keras_clip.optional import import_optional


@pytest.fixture
def without(monkeypatch):
    """Makes `import name` fail as if the package were not installed."""
    def hide(*names):
        for name in names:
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                monkeypatch.delitem(sys.modules, loaded)
            monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    return hide


def test_missing_scipy_names_the_eval_extra(without):
    without("scipy")
    with pytest.raises(ImportError, match=r"linear probe .*`scipy`.*pip install 'keras_clip\[eval\]'"):
        LogisticRegression(l2=1.0).fit(np.zeros((4, 2)), np.array([0, 1, 0, 1]))


def test_missing_matplotlib_names_the_eval_extra(without, tmp_path):
    without("matplotlib")
    with pytest.raises(ImportError, match=r"plots .*`matplotlib`.*pip install 'keras_clip\[eval\]'"):
        report.plot_per_class_accuracy(np.array([50.0, 100.0]), ["a", "b"], str(tmp_path / "p.png"))
    assert not (tmp_path / "p.png").exists()


def test_installed_module_is_returned_and_unknown_packages_name_themselves():
    assert import_optional("numpy", "x") is np
    with pytest.raises(ImportError, match=r"`no_such_pkg_kc` package.*pip install no_such_pkg_kc$"):
        import_optional("no_such_pkg_kc.sub", "Something")


def test_setup_declares_every_extra_the_code_names():
    import pathlib
    import re

    setup = (pathlib.Path(__file__).resolve().parents[1] / "setup.py").read_text()
    from keras_clip.optional import EXTRAS

    for module, extra in EXTRAS.items():
        assert re.search(rf'"{extra}": ', setup), extra
