"""A non-finite loss: the advice names a checkpoint from before the divergence (or says a
fresh run is needed), so following it cannot diverge again on the same weights."""

from __future__ import annotations

import re

from cli_helpers import run_cli
from sdelab.train.checkpoint import list_checkpoints

TINY = ["model.width=16", "model.depth=1", "model.embedding_dim=8", "train.batch_size=32",
        "train.log_every=1", "train.ckpt_every=1", "optim.warmup_steps=0"]  # fmt: skip
ADVICE = re.compile(r"sdelab train --resume --out (\S+) optim\.lr=(\S+) or")


def test_following_the_advice_after_a_blown_up_step_ends(tmp_path, capsys):
    """Five sane steps, then optim.lr=1e8: step 6's loss is finite but blows the weights up,
    its checkpoint is saved, and step 7 diverges on them. Resuming from step 6's weights would
    diverge at step 7 whatever the rate; the advice resumes from step 5's, so following it
    (each time ten times lower) reaches the end of the run."""
    run = tmp_path / "run"
    assert (
        run_cli(capsys, "train", "checkerboard", *TINY, "train.steps=5", "--out", str(run))[0] == 0
    )
    argv = ["train", "--resume", "--out", str(run), "train.steps=12", "optim.lr=1e8"]
    for _ in range(10):
        code, _, err = run_cli(capsys, *argv)
        if code == 0:
            break
        assert code == 2 and "training stopped" in err, err
        match = ADVICE.search(err)
        assert match is not None, err
        assert "from before" in err or "fresh run" in err, err
        # the checkpoint --resume takes is older than the step whose weights diverged
        diverged = int(re.search(r"step (\d+)'s weights gave it", err).group(1))
        assert all(step < diverged for step, _ in list_checkpoints(run)), err
        argv = ["train", "--resume", "--out", match.group(1), "train.steps=12",
                f"optim.lr={match.group(2)}"]  # fmt: skip
    else:
        raise AssertionError(f"the advice loops: {err}")
    assert list_checkpoints(run)[-1][0] == 12
    assert (run / "checkpoints" / "diverged").is_dir()  # set aside, not deleted


def test_divergence_from_the_first_steps_says_a_fresh_run_is_needed(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "checkerboard", *TINY, "train.steps=12", "optim.lr=1e8", "--out", str(run)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "no checkpoint from before the divergence is usable" in err, err
    assert "a fresh run is needed" in err and list_checkpoints(run) == []
