"""The top-level namespace: ``import qrobust`` is light, and every exported name resolves."""

import subprocess
import sys

import pytest

import qrobust


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test_import_does_not_import_torch():
    assert _run("import sys, qrobust; print('torch' in sys.modules)") == "False"


def test_every_exported_name_resolves():
    for name in qrobust.__all__:
        assert getattr(qrobust, name) is not None, name
    assert set(qrobust.__all__) <= set(dir(qrobust))
    assert qrobust.prepare is qrobust.prepare_qat
    assert issubclass(qrobust.QRobustError, ValueError)


def test_train_is_the_function_even_after_its_subpackage_is_imported():
    code = "import sys, qrobust.jobs, qrobust.train.loop, qrobust as qr; print(qr.train is sys.modules['qrobust.train.loop'].train)"
    assert _run(code) == "True"


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        qrobust.nonexistent  # noqa: B018
