"""qrobust.limits: one line naming the size and the limit, a sane default, and a light import."""

import os
import subprocess
import sys

import pytest

from qrobust import limits
from qrobust.errors import QRobustError
from qrobust.limits import GIB, check_memory, default_memory_limit


def test_an_estimate_above_the_limit_is_refused_with_both_sizes():
    check_memory("a thing", 2 * GIB, memory_limit=2)  # at the limit: accepted
    with pytest.raises(QRobustError) as error:
        check_memory("a noise bank", 3 * 10**12, memory_limit=4.5, lower="--n")
    message = str(error.value)
    assert message == (
        "a noise bank needs ~2,794 GiB, above the memory limit of 4.5 GiB; pass --memory-limit to raise it or lower --n"
    )
    assert "\n" not in message


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "4"])
def test_the_limit_must_be_a_positive_number(bad):
    with pytest.raises(QRobustError, match="--memory-limit must be a number of GiB > 0"):
        check_memory("a thing", 1, memory_limit=bad)


def test_the_default_is_most_of_the_physical_memory_or_of_a_lower_cgroup_limit(monkeypatch, tmp_path):
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB
    monkeypatch.setattr(limits, "_CGROUP_MAX", tmp_path / "absent")
    assert default_memory_limit() == pytest.approx(0.8 * physical)
    (tmp_path / "memory.max").write_text("max\n")
    monkeypatch.setattr(limits, "_CGROUP_MAX", tmp_path / "memory.max")
    assert default_memory_limit() == pytest.approx(0.8 * physical)
    (tmp_path / "memory.max").write_text(f"{GIB}\n")
    assert default_memory_limit() == pytest.approx(0.8)
    with pytest.raises(QRobustError, match=r"above the memory limit of 0\.8 GiB"):
        check_memory("a thing", GIB)


def test_importing_limits_loads_no_heavy_module():
    code = "import sys, qrobust.limits; print(sorted({'torch', 'numpy', 'qrobust.data'} & set(sys.modules)))"
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert finished.stdout.strip() == "[]"
