"""
All tests, grouped by the file they test. Tiny models and tiny corpora, so the whole suite runs in minutes on
two CPU cores.

    python test_all.py            # every test; ends with "N passed, N failed"
    python test_all.py resume     # only tests whose name contains "resume"
    python -m pytest test_all.py  # the same tests under pytest
"""
import functools
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def run(*args, ok=True, env=None, timeout=300):
    """Runs a project script the way a user would; returns the finished process."""
    cmd = [sys.executable, *args] if args[0].endswith(".py") else list(args)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def one_line_error(p, *needles):
    """A bad-input run must fail with one 'error: ...' line naming the problem, not a traceback."""
    assert p.returncode != 0, p.stdout
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err
    for needle in needles:
        assert needle in err, (needle, err)


@functools.cache
def tiny_world():
    """A 20-person synthetic world, prepared once per test run."""
    out = Path(tempfile.mkdtemp(prefix="world_"))
    run("prepare.py", "--world_size=20", "--n_renderings=8", f"--out={out}")
    return out


# a model small enough that a training step takes milliseconds
TINY = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--block_size=32", "--device_batch_size=4",
        "--total_batch_size=256", "--warmup_iters=2", "--eval_tokens=512", "--device=cpu"]


def losses(stdout):
    return {int(s): float(l) for s, l in re.findall(r"^step (\d+)/\d+ \| loss ([\d.]+)", stdout, re.M)}


# -----------------------------------------------------------------------------
# configurator.py

def test_configurator_files_and_overrides(tmp_path):
    from configurator import ConfigError, configure
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nn_layer = 8\nlearning_rate = 1  # an int where a float is expected widens\n")
    g = dict(n_layer=4, learning_rate=3e-3, block_pattern="T", compile=False, out_dir="out")
    resolved = configure(g, [str(cfg), "--block_pattern=TMM", "--compile=True", "--out_dir=123"])
    assert resolved == dict(n_layer=8, learning_rate=1.0, block_pattern="TMM", compile=True, out_dir="123")
    assert isinstance(g["learning_rate"], float)
    for argv, needle in [(["--nope=1"], "--nope: unknown config key 'nope'"),
                         (["--n_layer=2.5"], "--n_layer: n_layer must be int, got 2.5"),
                         (["--n_layer"], "--key=value"),
                         (["missing.py"], "config file missing.py not found")]:
        try:
            configure(dict(g), argv)
            raise AssertionError(f"{argv} was accepted")
        except ConfigError as e:
            assert needle in str(e), (needle, str(e))
    cfg.write_text("n_layer = 8\n\nbad_key = 3\n")
    try:
        configure(dict(g), [str(cfg)])
        raise AssertionError("unknown key in a config file was accepted")
    except ConfigError as e:
        assert str(e) == f"{cfg}:3: unknown config key 'bad_key'"


# -----------------------------------------------------------------------------
# common.py

def test_lr_schedules():
    from common import lr_at
    assert lr_at(0, 100, 1.0, 10) == 0.1 and lr_at(9, 100, 1.0, 10) == 1.0
    assert abs(lr_at(100, 100, 1.0, 10, "cosine", 0.1) - 0.1) < 1e-12
    assert lr_at(50, 100, 1.0, 10, "wsd", 0.0, 0.2) == 1.0  # stable phase
    assert abs(lr_at(90, 100, 1.0, 10, "wsd", 0.0, 0.2) - 0.5) < 1e-12  # halfway through the cool-down


def test_checkpoint_write_is_atomic(tmp_path):
    from common import load_checkpoint, save_checkpoint
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_args": {}, "step": 1})
    try:  # a write that dies half-way (here: an unpicklable object after a large tensor) ...
        save_checkpoint(path, {"model": {"w": torch.zeros(100_000)}, "model_args": {}, "step": 2, "bad": lambda: 0})
        raise AssertionError("the broken write succeeded")
    except Exception:
        pass
    ckpt = load_checkpoint(path)  # ... leaves the previous checkpoint whole, and no temp file behind
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    try:
        load_checkpoint(str(tmp_path / "bad.pt"))
        raise AssertionError("a corrupt checkpoint loaded")
    except ValueError as e:
        assert "bad.pt is unreadable" in str(e)


# -----------------------------------------------------------------------------
# train.py

def test_train_learns_and_checkpoint_is_complete(tmp_path):
    world = tiny_world()
    p = run("train.py", f"--data_dir={world}", f"--out_dir={tmp_path}", *TINY, "--max_iters=30",
            "--eval_interval=30", "--learning_rate=1e-2", "--block_pattern=TM")
    curve = losses(p.stdout)
    assert len(curve) == 30 and curve[30] < curve[1] - 1.0, curve
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # no pickled code in a checkpoint
    assert ckpt["step"] == 30 and ckpt["stage"] == "train" and ckpt["model_args"]["block_pattern"] == "TM"
    assert ckpt["config"]["max_iters"] == 30 and ckpt["data_state"]["windows_consumed"] == 30 * 8
    from model import GPT
    from prepare import Tokenizer
    model = GPT.from_checkpoint(ckpt)  # the checkpoint alone rebuilds model and tokenizer
    tok = Tokenizer.from_json(ckpt["tokenizer"])
    assert model.pattern == "TM" and tok.vocab_size == ckpt["model_args"]["vocab_size"]
    assert "val loss" in (tmp_path / "log.txt").read_text()


def test_train_resume_after_kill_continues_exactly(tmp_path):
    """Kill a run right after a checkpoint, resume it, and the losses match an uninterrupted run bit for bit."""
    world = tiny_world()
    args = [f"--data_dir={world}", *TINY, "--max_iters=12", "--eval_interval=3", "--block_pattern=MT"]
    full = losses(run("train.py", *args, f"--out_dir={tmp_path / 'a'}").stdout)
    proc = subprocess.Popen([sys.executable, "train.py", *args, f"--out_dir={tmp_path / 'b'}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("saved") and "at step 6" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    resumed = losses(run("train.py", *args, f"--out_dir={tmp_path / 'b'}", "--init_from=resume").stdout)
    assert min(resumed) > 6 and resumed == {s: full[s] for s in resumed}, (resumed, full)
    assert set(resumed) == set(range(min(resumed), 13))


def test_train_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 gloo processes sees the same global batches as 1 process with grad accumulation."""
    world = tiny_world()
    args = ["train.py", f"--data_dir={world}", *TINY, "--max_iters=6", "--eval_interval=6", "--block_pattern=TM"]
    one = losses(run(*args, f"--out_dir={tmp_path / 'one'}").stdout)
    two = losses(run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                     f"--out_dir={tmp_path / 'two'}").stdout)
    assert one.keys() == two.keys() == set(range(1, 7))
    assert all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)


def test_train_bad_input_is_one_line(tmp_path):
    world = tiny_world()
    one_line_error(run("train.py", "--data_dir=/nonexistent", ok=False), "/nonexistent", "prepare.py")
    one_line_error(run("train.py", "configs/nope.py", ok=False), "configs/nope.py not found")
    one_line_error(run("train.py", "--unknown=1", ok=False), "unknown config key 'unknown'")
    one_line_error(run("train.py", "--block_pattern=TXM", f"--data_dir={world}", ok=False), "block_pattern='TXM'")
    (tmp_path / "ckpt.pt").write_bytes(b"\x00" * 100)
    one_line_error(run("train.py", f"--data_dir={world}", f"--out_dir={tmp_path}", "--init_from=resume", ok=False),
                   "ckpt.pt is unreadable")


def test_every_config_builds_what_it_says(tmp_path):
    """Each config's settings are all known keys, its pattern is the built model's, and it trains a step
    (width, context and batch scaled down to CPU size; depth and pattern kept)."""
    from configurator import configure, script_defaults
    from model import GPT, GPTConfig
    world = tiny_world()
    train_defaults = script_defaults(ROOT / "train.py")
    configs = sorted((ROOT / "configs").glob("*.py"))
    assert len(configs) >= 8
    for path in configs:
        if path.name.startswith(("rag_", "refrag_")):
            continue  # the fine-tuning stages test their own configs
        cfg = configure(dict(train_defaults), [str(path)])
        args = {k: cfg[k] for k in GPTConfig.__dataclass_fields__ if k in cfg} | {"vocab_size": 512}
        with torch.device("meta"):  # full size, no memory: the pattern and the parameter count it describes
            full = GPT(GPTConfig(**args))
        expected = (cfg["block_pattern"] * cfg["n_layer"])[:cfg["n_layer"]]
        assert full.pattern == expected, path
        p = run("train.py", str(path), f"--data_dir={world}", f"--out_dir={tmp_path / path.stem}", "--max_iters=1",
                "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--block_size=16", "--device_batch_size=2",
                "--total_batch_size=32", "--eval_tokens=32", "--device=cpu", "--compile=False")
        assert f"model: {expected} pattern" in p.stdout, (path, p.stdout[-500:])
        assert len(losses(p.stdout)) == 1


# -----------------------------------------------------------------------------
# test runner: python test_all.py [substring ...]

if __name__ == "__main__":
    chosen = sys.argv[1:]
    tests = [(n, f) for n, f in list(globals().items()) if n.startswith("test_") and callable(f)
             and (not chosen or any(c in n for c in chosen))]
    passed, failed, t_all = 0, [], time.time()
    for name, fn in tests:
        t0 = time.time()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                fn(**({"tmp_path": Path(tmp)} if "tmp_path" in inspect.signature(fn).parameters else {}))
            passed += 1
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:
            import traceback
            failed.append(name)
            print(f"FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}", flush=True)
    print(f"\n{len(tests)} tests in {time.time() - t_all:.0f}s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    print(f"{passed} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)
