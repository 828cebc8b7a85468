"""``effdl demo``'s figures: every stage in the full demo's order in one process, each headline's claim checked
against the numbers behind it."""

import subprocess
import sys

from PIL import Image

import effdl.core.data as data
from effdl.demo import STAGES, run_demo


def test_stages_in_one_process_back_their_headlines(tmp_path, monkeypatch):
    # A machine with only what pip installed: no Debian Fashion-MNIST, nothing in the cache.
    monkeypatch.setattr(data, "FASHION_MNIST_DEB_DIR", tmp_path / "not-installed")
    monkeypatch.setenv("EFFDL_CACHE", str(tmp_path / "cache"))
    reports = run_demo(tmp_path, quick=True)
    assert list(reports) == list(STAGES)  # every stage, in the full demo's order, in this one process
    assert "shapes10: 10 classes" in (tmp_path / "report.md").read_text()

    fpdt = reports["fpdt"]
    assert fpdt.metrics["fpdt_peak_mib"] < fpdt.metrics["plain_peak_mib"]
    assert f"plain {fpdt.metrics['plain_peak_mib']:,.0f} MiB vs FPDT {fpdt.metrics['fpdt_peak_mib']:,.0f} MiB" \
        in fpdt.headline

    soft = reports["soft"]
    assert soft.metrics["soft_ms"] < soft.metrics["sdpa_ms"]
    assert f"faster than SDPA at {soft.metrics['tokens']:,.0f} tokens" in soft.headline
    assert soft.headline.startswith("shapes10 top-1")

    flover = reports["flover"]
    assert flover.metrics["fused_mean_e2e_s"] <= flover.metrics["static_mean_e2e_s"]
    assert "x lower)" in flover.headline

    for report in reports.values():
        for image in report.images:
            assert image.stat().st_size > 1000, image
    with Image.open(tmp_path / "sprnet_overlay.png") as overlay:
        assert min(overlay.size) >= 512, overlay.size


def test_stage_modules_do_not_import_the_demo():
    code = ("import sys; import effdl.soft.demo, effdl.sprnet.demo, effdl.fpdt.demo, effdl.exflow.demo, "
            "effdl.flover.demo; assert 'effdl.demo' not in sys.modules, 'a stage imports effdl.demo'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
