"""Two DDP workers on loopback (gloo) stay identical and match one process
training on the same global batches."""
import contextlib
import os
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from hashemb.data import SyntheticCriteo                      # noqa: E402
from hashemb.torch.ddp import build_model, synthetic_batches, train_steps   # noqa: E402

# an odd global batch: shards of 127 and 128 (averaging shard means was wrong there)
ARGS = dict(steps=4, batch=255, lr=0.5, scale=0.001, compression=100.0, seed=3)


def _kill_run(p, tag):
    """Kill torchrun (its process group) and every worker of this run: the
    workers sit in sessions of their own, so a killed torchrun leaves them
    running, waiting on their peers (a CI run once hung there for good, in
    a communicate() on the pipes they held). They are found by ``tag``, a
    path only this run's command lines hold."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tag.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
    p.wait()


def _torchrun(cmd, env, log, timeout):
    """torchrun's exit status, its output going to ``log`` (a file: no pipe for
    a stray worker to hold open); None when it ran past ``timeout``."""
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_run(p, cmd[-1])
            return None


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_workers_match_single_process(tmp_path):
    a = ARGS
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    # a run takes about 6 s; one that has not finished in 120 s is stuck at
    # the rendezvous (seen once in CI, with no output): tried once more
    for attempt in range(2):
        save = tmp_path / f"try{attempt}"
        save.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "hashemb.torch.ddp", "--steps", str(a["steps"]),
               "--batch-size", str(a["batch"]), "--lr", str(a["lr"]), "--scale", str(a["scale"]),
               "--compression", str(a["compression"]), "--seed", str(a["seed"]),
               "--save", str(save / "rank{rank}.pt")]
        code = _torchrun(cmd, env, tmp_path / f"log{attempt}.txt", timeout=120)
        if code is not None:
            break
    err = (tmp_path / f"log{attempt}.txt").read_text()
    assert code is not None, f"torchrun with 2 workers did not finish in 120 s, twice: {err[-3000:]}"
    assert code == 0, err[-3000:]
    tmp_path = save
    s0 = torch.load(tmp_path / "rank0.pt")
    s1 = torch.load(tmp_path / "rank1.pt")
    card = SyntheticCriteo(scale=a["scale"], seed=a["seed"]).cardinalities
    single = build_model(card, compression=a["compression"], seed=a["seed"])
    before = single.embedding.weight.detach().clone()
    train_steps(single, synthetic_batches(a["steps"], a["batch"], a["scale"], a["seed"]), a["lr"])
    ref = single.state_dict()
    assert not torch.equal(ref["embedding.weight"], before)      # it did train
    for k, v in s0.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, s1[k]), k                         # replicas identical
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--batch-size", "0"),
                                         ("--lr", "-1"), ("--scale", "2")])
def test_command_line_refuses_bad_numbers_before_starting(flag, value, capsys):
    # (steps 0 and batch 0 failed with an IndexError / ZeroDivisionError
    # after the process group had started)
    from hashemb.torch.ddp import main
    with pytest.raises(SystemExit) as e:
        main([flag, value])
    assert e.value.code == 2 and f"argument {flag}: expected" in capsys.readouterr().err
