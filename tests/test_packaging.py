"""The package declares ranges (users on other torch versions can install it); this project's
own install pins exact versions through constraints.txt, which the Makefile uses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_torch_is_a_range_in_the_metadata_and_pinned_for_the_project():
    meta = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", meta, re.M | re.S).group(1)
    (torch_dep,) = re.findall(r'"(torch[<>=!~ ][^"]*)"', deps)
    assert ">=" in torch_dep and "==" not in torch_dep
    pins = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if "==" in ln]
    assert any(re.fullmatch(r"torch==\d+\.\d+\.\d+", p.strip()) for p in pins)
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile
    stamp = re.search(r"^\$\(STAMP\):(.*)$", makefile, re.M)
    assert stamp and "constraints.txt" in stamp.group(1)  # a new pin reinstalls


#: What ``import sdelab`` offers a user: the schedules, the model wrapper and converter, the
#: oracle, the loss, sampling, likelihood with its option objects, bounds, bits/dim and the
#: adapters for models trained elsewhere.
PUBLIC = {
    "CosineSchedule", "FunctionSchedule", "LogSNRSchedule", "Schedule", "SubVPSchedule",
    "TutorialSchedule", "VDMLinearSchedule", "VESchedule", "VPSchedule", "make_schedule",
    "ScoreModel", "convert", "GaussianData", "dsm_loss", "sample", "SampleResult",
    "log_likelihood", "LikelihoodResult", "Exact", "Hutchinson", "Augmented", "Quadrature",
    "Randomized", "elbo", "scoreflow_bound", "bits_per_dim", "evaluate_likelihood",
    "nats_to_bpd", "load_diffusers", "from_diffusers", "from_k_diffusion", "__version__",
}  # fmt: skip


def test_the_public_namespace_is_the_curated_set_and_every_name_resolves():
    import sdelab

    assert len(sdelab.__all__) == len(set(sdelab.__all__))
    assert set(sdelab.__all__) == PUBLIC
    for name in sdelab.__all__:
        assert getattr(sdelab, name) is not None, name
    assert sdelab.__version__ == re.search(
        r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M
    ).group(1)


def test_import_sdelab_works_without_diffusers():
    """diffusers is an optional extra: with it made unimportable, ``import sdelab`` and the
    adapters that need no diffusers still work; only loading a diffusers folder says so."""
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import sdelab, torch\n"
        "score_fn, sde = sdelab.from_k_diffusion(lambda x, s: 0 * x, 0.01, 10.0)\n"
        "assert score_fn(torch.zeros(2, 3), torch.full((2,), 0.5)).shape == (2, 3)\n"
        "try:\n"
        "    sdelab.load_diffusers('nowhere')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'sdelab[diffusers]'" in out.stdout
