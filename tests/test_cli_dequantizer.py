"""`sdelab train-dequantizer` and `sdelab likelihood --dequantizer` on a tiny digits run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cli_helpers import run_cli
from sdelab.cli import main
from sdelab.train.checkpoint import list_checkpoints
from sdelab.train.dequantizer import load_dequantizer

TINY = [
    "model.base_channels=8",
    "model.channel_mults=[1,2]",
    "model.num_groups=4",
    "model.mid_attention=false",
    "optim.warmup_steps=0",
    "train.steps=10",
    "train.batch_size=16",
    "train.log_every=5",
    "train.ckpt_every=10",
]
DEQ = ["--batch-size", "8", "--log-every", "2", "--ckpt-every", "3", "--n-samples", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("deq") / "run"
    assert main(["train", "images/digits", *TINY, "--out", str(path)]) == 0
    return path


def test_train_resume_equals_uninterrupted(run_dir, tmp_path, capsys):
    """Six steps in one go and 3 + 3 steps with --resume give the same weights and losses (the
    optimizer and generator states are in the checkpoint)."""
    full, split = tmp_path / "full", tmp_path / "split"
    code, _, err = run_cli(capsys, "train-dequantizer", str(run_dir), *DEQ, "--steps", "6",
                           "--out", str(full))  # fmt: skip
    assert code == 0, err
    assert main(["train-dequantizer", str(run_dir), *DEQ, "--steps", "3", "--out", str(split)]) == 0
    code, _, err = run_cli(capsys, "train-dequantizer", str(run_dir), *DEQ, "--steps", "6",
                           "--out", str(split))  # fmt: skip
    assert code == 2 and "not empty" in err  # no --resume: refused, nothing overwritten
    args = ["train-dequantizer", str(run_dir), *DEQ, "--steps", "6", "--out", str(split)]
    assert main([*args, "--resume"]) == 0
    a, _ = load_dequantizer(full, "raw")
    b, record = load_dequantizer(split, "raw")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)

    def losses(d):  # step -> loss (the split run also logged its last step, 3)
        rows = [json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss_bpd"] for r in rows}

    a_loss, b_loss = losses(full), losses(split)
    assert set(a_loss) <= set(b_loss) and all(a_loss[k] == b_loss[k] for k in a_loss)
    assert record["levels"] == 17 and record["image_shape"] == [1, 8, 8]
    assert list_checkpoints(split)[-1][0] == 6
    # other options on resume: one-line error
    code, _, err = run_cli(capsys, *args, "--lr", "0.01", "--resume")
    assert code == 2 and "only --steps may change" in err


def test_likelihood_with_the_dequantizer_is_a_finite_bound(run_dir, tmp_path, capsys):
    deq = tmp_path / "deq"
    assert main(["train-dequantizer", str(run_dir), *DEQ, "--steps", "2", "--out", str(deq)]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "likelihood", str(run_dir), "--dequantizer", str(deq),
                             "--probes", "1", "--n", "8", "--tol", "1e-2")  # fmt: skip
    assert code == 0, err
    (path,) = run_dir.glob("likelihood_ode_*_variational_*.json")
    record = json.loads(path.read_text())
    assert record["dequantization"] == "variational"
    # a bound on −log2 P(k)/D of 17-level data: positive and below the uniform ceiling log2 17
    # plus the density's misfit (finite)
    assert 0 < record["bpd_mean"] and math.isfinite(record["bpd_mean"])


def test_a_dequantizer_for_other_data_is_refused(run_dir, tmp_path, capsys):
    deq = tmp_path / "deq"
    assert main(["train-dequantizer", str(run_dir), *DEQ, "--steps", "1", "--out", str(deq)]) == 0
    record = json.loads((deq / "dequantizer.json").read_text())
    record["levels"] = 256
    (deq / "dequantizer.json").write_text(json.dumps(record))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "likelihood", str(run_dir), "--dequantizer", str(deq),
                           "--n", "4")  # fmt: skip
    assert code == 2 and "levels=256" in err and len(err.strip().splitlines()) == 1


def test_a_dequantizer_record_that_does_not_fit_its_tensors_is_one_line(run_dir, tmp_path, capsys):
    """dequantizer.json edited so that its flow no longer matches the checkpoint's tensors:
    one line naming the file (exit 2), not a state-dict traceback."""
    deq = tmp_path / "deq"
    assert main(["train-dequantizer", str(run_dir), *DEQ, "--steps", "1", "--out", str(deq)]) == 0
    record = json.loads((deq / "dequantizer.json").read_text())
    key = next(k for k, v in record["flow"].items() if isinstance(v, int) and v > 1)
    record["flow"][key] *= 2
    (deq / "dequantizer.json").write_text(json.dumps(record))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "likelihood", str(run_dir), "--dequantizer", str(deq),
                           "--n", "4")  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "dequantizer.json does not match the tensors" in lines[0]
