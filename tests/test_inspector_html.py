"""The inspector's HTML page in a real browser: Debian's chromium, headless.

Checks that the page's script runs without an error (it marks the page ready, and the
``#NAME`` fragment selects a node and fills the details panel) and that a screenshot of the
page is not blank. `make test` installs chromium and graphviz when they are missing
(`make system-deps`); without them these tests fail rather than skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torchvision
from matplotlib import image

import prunefx
from prunefx.inspector.graphviz import PINNED_FILL

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1400,1000"]

pytestmark = pytest.mark.xdist_group("inspector")


def chromium(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: run `make test` (or `make system-deps`), which installs Debian's chromium"
    profile = tmp / f"profile-{len(list(tmp.iterdir()))}"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, url],
                          capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    assert shutil.which("dot"), "graphviz's `dot` is missing: run `make test` (or `make system-deps`), which installs it"
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    path = tmp_path_factory.mktemp("html") / "resnet50.html"
    prunefx.inspect(model, torch.randn(1, 3, 64, 64)).to_html(str(path))
    return path


def test_page_script_runs_and_selects_the_node_in_the_url(page, tmp_path):
    done = chromium(tmp_path, page.as_uri() + "#layer1.0.conv3", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert '<span id="prunefx-ready" hidden="">' in dom and 'data-pfx-ready="1"' in dom, dom[-2000:]
    assert '<pre id="prunefx-error"' not in dom
    assert "Uncaught" not in done.stderr and "CONSOLE" not in done.stderr.replace("CONSOLE(0)", ""), done.stderr[-2000:]
    # the fragment selected the conv: its SVG node is outlined and the panel shows its details
    assert 'id="n_layer1_0_conv3" class="node pfx-sel"' in dom
    panel = dom[dom.index('class="pfx-panel-body"'):]
    assert "<h3>layer1.0.conv3</h3>" in panel and "1×256×16×16" in panel and "resnet.py" in panel


def test_group_fragment_outlines_every_node_of_the_group(page, tmp_path):
    done = chromium(tmp_path, page.as_uri() + "#group:layer1.0.conv3", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    outlined = set(re.findall(r'<g id="n_([^"]+)" class="node pfx-hl">', dom))
    report_nodes = {"layer1_0_conv3", "layer1_0_bn3", "layer1_0_downsample_0", "layer1_0_downsample_1", "add",
                    "layer1_0_relu_2", "layer1_1_conv3", "layer1_1_bn3", "add_1", "layer1_1_relu_2",
                    "layer1_2_conv3", "layer1_2_bn3", "add_2", "layer1_2_relu_2"}
    assert outlined == report_nodes
    assert "<h3>group layer1.0.conv3</h3>" in dom


def test_screenshot_is_not_blank(page, tmp_path):
    png = tmp_path / "shot.png"
    done = chromium(tmp_path, page.as_uri(), f"--screenshot={png}")
    assert done.returncode == 0 and png.exists(), done.stderr[-2000:]
    pixels = image.imread(str(png))[..., :3]
    assert pixels.shape[:2] == (1000, 1400)
    assert pixels.std() > 0.05, "the screenshot is (almost) one colour"
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert non_white > 0.03, f"only {non_white:.1%} of the screenshot is not white"
    # the picture is there: some pixels carry the group colours (not only grey text on white)
    saturated = (pixels.max(axis=-1) - pixels.min(axis=-1) > 0.15).mean()
    assert saturated > 0.01, f"only {saturated:.2%} coloured pixels: the graph picture is missing"
    assert PINNED_FILL.startswith("#")
