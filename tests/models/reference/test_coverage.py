"""Every registered mixer kind has an independent reference in this folder: a new mixer fails
this test until its reference (paper equations, per token, fp64) is written next to the others."""
from pathlib import Path

from loom.models.mixers import MIXERS

HERE = Path(__file__).resolve().parent
COVERED_BY = {"attn": "test_attn.py", "swa": "test_attn.py", "s2": "test_s2.py", "rat": "test_rat.py",
              "linear": "test_linear.py", "memory": "test_memory.py", "titans_mag": "test_titans_mag.py",
              "titans_mac": "test_titans_mac.py", "gdn": "test_gdn.py", "mamba2": "test_mamba2.py"}


def test_every_mixer_kind_has_a_reference():
    missing = sorted(set(MIXERS) - set(COVERED_BY))
    assert not missing, f"mixer kinds without a reference in tests/models/reference/: {missing}"
    for kind, name in COVERED_BY.items():
        text = (HERE / name).read_text()
        assert f'build("{kind}"' in text or (kind in ("attn", "swa") and "build(kind" in text), (kind, name)
