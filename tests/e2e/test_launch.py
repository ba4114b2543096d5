"""Launchers: shell syntax, Slurm rendezvous rendering from a fake environment, the sbatch preemption
flow (USR2 -> stop file -> clean exit -> requeue) with fake srun/scontrol, a real 2-process torchrun,
and the dry run on a config far larger than this machine."""
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ["slurm/seqpar.sbatch", "slurm/rendezvous.sh", "launch/torchrun.sh", "launch/setup.sh"]
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "train.seq_len=32", "train.batch_size=2",
        "train.device=cpu", "train.eval_every=0", "data.max_bytes=200000", "logging.progress=false"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _fake_bin(tmp_path):
    """A PATH folder with fake `scontrol` (expands node003/node004, logs requeues) and `srun` (logs its
    arguments, then behaves like a run that polls the stop file and, once it appears, exits $FAKE_RC: 3 = stopped
    and saved; FAKE_NOWAIT=1: exits $FAKE_RC at once). tests/e2e/test_slurm_cluster.py runs the real thing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n'
        'if [ "$1 $2" = "show hostnames" ]; then printf "node003\\nnode004\\n"; exit 0; fi\n'
        'echo "$@" >> "$FAKE_LOG/scontrol.log"\n')
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\n'
        'printf "%s\\n" "$@" > "$FAKE_LOG/srun.args"\n'
        'for a in "$@"; do case "$a" in train.stop_file=*) stop=${a#train.stop_file=};; esac; done\n'
        '[ "${FAKE_NOWAIT:-0}" = 1 ] && exit "${FAKE_RC:-3}"\n'
        'while [ ! -e "$stop" ]; do sleep 0.05; done\n'
        'echo "checkpointed; stopping cleanly"\n'
        'exit "${FAKE_RC:-3}"\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _slurm_env(tmp_path, bin_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and not k.startswith("SEQPAR_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_NODELIST="node[003-004]", SLURM_NNODES="2",
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="seqpar", SLURM_GPUS_ON_NODE="4", FAKE_LOG=str(tmp_path),
               **extra)
    return env


def test_rendezvous_is_rendered_from_the_slurm_environment(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    render = ["bash", "-c", "source slurm/rendezvous.sh && seqpar_rendezvous"]
    out = subprocess.run(render, cwd=ROOT, env=_slurm_env(tmp_path, bin_dir), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["NNODES=2", "NPROC_PER_NODE=4", "RDZV_ENDPOINT=node003:29500",
                                       "RDZV_ID=4242", "LOG_DIR=logs/seqpar-4242"]
    env = _slurm_env(tmp_path, bin_dir, SEQPAR_RDZV_PORT="12345", SEQPAR_GPUS_PER_NODE="2")
    out = subprocess.run(render, cwd=ROOT, env=env, capture_output=True, text=True)
    assert "RDZV_ENDPOINT=node003:12345" in out.stdout and "NPROC_PER_NODE=2" in out.stdout
    env = _slurm_env(tmp_path, bin_dir)
    del env["SLURM_JOB_NODELIST"]
    out = subprocess.run(render, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "inside a Slurm job" in out.stderr


def _sbatch_usr2(tmp_path, **extra):
    """Run slurm/seqpar.sbatch under the fakes, send it USR2 once the (fake) training runs; (exit code, output)."""
    bin_dir = _fake_bin(tmp_path)
    env = _slurm_env(tmp_path, bin_dir, SLURM_SUBMIT_DIR=ROOT, SEQPAR_LOG_DIR=str(tmp_path / "logs"), **extra)
    proc = subprocess.Popen(["bash", "slurm/seqpar.sbatch", "experiment=foo", "train.steps=7"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "srun.args").exists():  # the (fake) training is running
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGUSR2)  # what Slurm does 300 s before the time limit
        out = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


@pytest.mark.timeout(60)
def test_sbatch_usr2_stops_the_run_then_requeues(tmp_path):
    rc, out = _sbatch_usr2(tmp_path)  # the run stops and saves: exit 3
    log_dir = tmp_path / "logs"
    assert rc == 3, out
    args = (tmp_path / "srun.args").read_text().splitlines()
    for want in ["--nnodes=2", "--nproc_per_node=4", "--rdzv_backend=c10d", "--rdzv_endpoint=node003:29500",
                 "--rdzv_id=4242", "train.py", f"train.stop_file={log_dir}/STOP", "experiment=foo", "train.steps=7"]:
        assert want in args, (want, args)
    assert args.index(f"train.stop_file={log_dir}/STOP") < args.index("experiment=foo")  # user overrides win
    assert f"--output={log_dir}/node-%n.out" in args
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert "requeueing job 4242" in out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", [0, 1, 2, 4])
def test_sbatch_requeues_only_a_run_that_stopped_and_saved(tmp_path, code):
    # USR2 came, but the run finished / crashed / was a user error / diverged: the job ends with that code.
    rc, out = _sbatch_usr2(tmp_path, FAKE_RC=str(code))
    assert rc == code, out
    assert not (tmp_path / "scontrol.log").exists() and "not requeueing" in out, out


@pytest.mark.timeout(60)
def test_sbatch_does_not_requeue_a_stop_without_preemption(tmp_path):
    # Exit 3 without USR2 (train.max_minutes, a stop file touched by hand, SIGTERM from scancel): final.
    bin_dir = _fake_bin(tmp_path)
    env = _slurm_env(tmp_path, bin_dir, SLURM_SUBMIT_DIR=ROOT, SEQPAR_LOG_DIR=str(tmp_path / "logs"),
                     FAKE_NOWAIT="1")
    proc = subprocess.run(["bash", "slurm/seqpar.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert not (tmp_path / "scontrol.log").exists() and "requeueing" not in proc.stdout, proc.stdout


def test_sbatch_cpu_job_names_its_process_count(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    render = ["bash", "-c", "source slurm/rendezvous.sh && seqpar_rendezvous"]
    env = _slurm_env(tmp_path, bin_dir, SLURM_GPUS_PER_NODE="0")
    del env["SLURM_GPUS_ON_NODE"]  # --gpus-per-node=0: Slurm sets no GPU count
    out = subprocess.run(render, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "SEQPAR_NPROC_PER_NODE" in out.stderr, out.stderr
    env["SEQPAR_NPROC_PER_NODE"] = "2"
    out = subprocess.run(render, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "NPROC_PER_NODE=2" in out.stdout.splitlines(), out.stderr


@pytest.mark.timeout(120)
def test_torchrun_launcher_runs_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "launch/torchrun.sh", "2", *TINY, "parallel.cp=2", "train.steps=2",
                           f"logging.run_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh=[dp=1, cp=2]" in proc.stdout and "step      2/2" in proc.stdout, proc.stdout


def _dry_run(*overrides, env_extra=None):
    code = ("import resource, sys, train; rc = train.main(sys.argv[1:]); "
            "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, "--dry-run", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


def _gib(stdout, key):
    line = next(line for line in stdout.splitlines() if line.strip().startswith(key + " "))
    return float(line.split()[-1])


@pytest.mark.timeout(120)
def test_dry_run_of_a_config_larger_than_the_machine():
    big = ["model=llama3-8b", "parallel.dp=1", "parallel.cp=8", "train.seq_len=1048576", "train.batch_size=1"]
    proc = _dry_run(*big)
    # Does not fit: exit 2 (a user decision, scriptable) with one error line after the estimate.
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: the configuration does not fit"), proc.stderr
    out = proc.stdout
    assert "world 8 = dp 1 x cp 8" in out and "8.030B params" in out and "131,072 tokens per GPU" in out, out
    # fp32 params / grads / Adam moments of 8.03B params sharded 8 ways: 4, 4 and 8 bytes each.
    assert _gib(out, "params") == pytest.approx(8.03e9 * 4 / 8 / 2**30, rel=0.01)
    assert _gib(out, "optimizer") == pytest.approx(2 * _gib(out, "params"), rel=0.01)
    assert "does NOT fit" in out and "train.ac=full" in out
    # Nothing was allocated: a 32 GB (fp32) model dry-runs in a few hundred MB.
    rss_gib = int(out.split("MAXRSS_KIB")[1].split()[0]) / 2**20
    assert rss_gib < 2.0, rss_gib
    # BPT + full AC cut the activations by more than 10x.
    lean = _dry_run(*big, "train.ac=full", "train.ffn_chunk=4096")
    assert _gib(lean.stdout, "activations") < _gib(out, "activations") / 10
    fits = _dry_run(*big, "train.ac=full", "train.ffn_chunk=4096", "parallel.cp=32")
    assert fits.returncode == 0 and "  fits in" in fits.stdout, fits.stdout
    # Config errors stop the dry run like a real run, as one line.
    bad = _dry_run("parallel.cp=3", "train.seq_len=600", env_extra={"WORLD_SIZE": "8", "RANK": "0"})
    assert bad.returncode == 2 and "parallel.cp=3 does not divide the world size 8" in bad.stderr, bad.stderr
