"""slurm/seqpar.sbatch on a REAL one-node Slurm cluster (slurmctld + slurmd + munge, started by
tests/slurm/local_cluster.sh, installed with apt-get when missing): a 2-process CPU/gloo job (ring attention over
cp=2) runs to COMPLETED with exit 0; a second job is preempted the way Slurm does it (USR2 to the batch script),
checkpoints, exits 3, requeues itself, resumes and finishes with the same per-step loss curve as the
uninterrupted job, bit for bit (CPU, same 2 processes, same reductions: deterministic).

Skipped, with local_cluster.sh's reason, only where the packages are missing and cannot be installed (not root,
no apt-get, apt failed). A cluster this module started is stopped at the end (SEQPAR_SLURM_KEEP=1 leaves it up);
one already running is reused and left running."""
import json
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = os.path.join(ROOT, "tests", "slurm", "local_cluster.sh")
STEPS = 40
# ~80 ms a step on 2 CPU processes: the preempted job is signalled after a few steps and has ~3 s left to stop.
RUN = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "train.seq_len=64",
       "train.batch_size=4", "train.device=cpu", "train.eval_every=0", "data.max_bytes=200000",
       "logging.progress=false", "logging.log_every=1", "parallel.cp=2", f"train.steps={STEPS}",
       "checkpoint.every=1000"]  # checkpoints only where the run stops (preempted or finished)
CPU_JOB = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2"]


@dataclass
class Cluster:
    env: dict
    jobs: list


@pytest.fixture(scope="module")
def cluster():
    t0 = time.monotonic()
    proc = subprocess.run(["bash", CLUSTER, "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 77:
        pytest.skip(f"no Slurm cluster: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conf = re.search(r"^SLURM_CONF=(.*)$", proc.stdout, re.M).group(1)
    started = "cluster: started" in proc.stdout
    print(f"\nslurm cluster {'started' if started else 'reused'} in {time.monotonic() - t0:.1f}s ({conf})")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SEQPAR_"))}
    env.update(SLURM_CONF=conf, OMP_NUM_THREADS="1", PATH=f"{env.get('PATH', '')}:/usr/sbin")
    c = Cluster(env=env, jobs=[])
    yield c
    for job in c.jobs:  # a failed test leaves nothing queued behind it
        subprocess.run(["scancel", job], env=env, capture_output=True)
    if started and os.environ.get("SEQPAR_SLURM_KEEP") != "1":
        subprocess.run(["bash", CLUSTER, "down"], capture_output=True, timeout=60)


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def submit(c: Cluster, tmp_path, name, *overrides):
    env = {**c.env, "SEQPAR_NPROC_PER_NODE": "2", "SEQPAR_LOG_DIR": str(tmp_path / "logs"),
           "SEQPAR_RDZV_PORT": str(_free_port())}
    proc = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", *CPU_JOB, f"--output={tmp_path}/batch.out",
                           "slurm/seqpar.sbatch", *RUN, f"logging.run_dir={tmp_path / 'run'}", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    c.jobs.append(job)
    return job


def job_info(c: Cluster, job) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=c.env, capture_output=True, text=True).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def job_endings(c: Cluster, job) -> list:
    """Slurm's own record of each time the job ended (jobcomp/filetxt, the cluster's stand-in for sacct):
    [(JobState, ExitCode, DerivedExitCode = the highest exit code of its steps)]; a requeued run shows PENDING."""
    log = re.search(r"^JobCompLoc=(.*)$", open(c.env["SLURM_CONF"]).read(), re.M).group(1)
    out = []
    for line in open(log).read().splitlines():
        rec = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if rec.get("JobId") == job:
            out.append((rec["JobState"], rec["ExitCode"], rec["DerivedExitCode"]))
    return out


def wait_for(what, pred, timeout, poll=0.1):
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < end, f"timed out after {timeout}s waiting for {what}"
        time.sleep(poll)


def wait_done(c, job, timeout=240):
    return wait_for(f"job {job} to end", lambda: (i := job_info(c, job)).get("JobState") in
                    ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and i, timeout)


def logs(tmp_path):
    node = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("node-*.out")))
    return (tmp_path / "batch.out").read_text(), node


def metrics(tmp_path) -> dict:
    """{step: record} of metrics.jsonl; every step exactly once."""
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r for r in lines}


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("slurm_uninterrupted")
    t0 = time.monotonic()
    job = submit(cluster, tmp_path, "seqpar-ci")
    info = wait_done(cluster, job)
    print(f"\nuninterrupted job {job}: {info['JobState']} in {time.monotonic() - t0:.1f}s")
    return job, info, tmp_path


@pytest.mark.timeout(900)  # the fixtures may install the packages (apt-get) and start the cluster first
def test_sbatch_runs_two_cpu_processes_to_completion(cluster, uninterrupted):
    job, info, tmp_path = uninterrupted
    batch, node = logs(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, batch, node[-3000:])
    assert info["Restarts"] == "0" and job_endings(cluster, job) == [("COMPLETED", "0:0", "0:0")]
    assert f"job {job}, 1 nodes x 2 processes" in batch and "training exited with status 0" in batch, batch
    assert "requeueing" not in batch
    assert "mesh=[dp=1, cp=2]" in node and f"step     {STEPS}/{STEPS}" in node, node[-3000:]
    m = metrics(tmp_path)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert m[STEPS]["loss"] < m[1]["loss"]


@pytest.mark.timeout(600)
def test_usr2_checkpoints_requeues_and_resumes_to_the_same_loss_curve(cluster, uninterrupted, tmp_path):
    t0 = time.monotonic()
    job = submit(cluster, tmp_path, "seqpar-ci-preempted")
    jsonl = tmp_path / "run" / "metrics.jsonl"
    # A few steps in, Slurm's preemption warning: USR2 to the batch script only (what --signal=B:USR2@300 does;
    # --full would also signal srun, which forwards it to torchrun).
    wait_for("the first steps", lambda: jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3, 120, 0.02)
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], env=cluster.env, check=True)
    # The run checkpoints and exits 3; the script requeues the job. Slurm holds a requeued job for 2 minutes
    # (Reason=BeginTime, set about a second after the requeue); a real cluster waits them out, the test starts it
    # sooner, but not at once: a start within ~a second of the requeue meets the old run's revoked credential
    # ("Killing non-startable batch job: Job credential revoked", the job FAILS).
    pending_since = []

    def restarted():
        i = job_info(cluster, job)
        if i.get("Restarts") == "1" and i.get("JobState") == "PENDING":
            pending_since[:] = pending_since or [time.monotonic()]
            if i.get("Reason") == "BeginTime" and time.monotonic() - pending_since[0] > 2:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env,
                               capture_output=True)
                time.sleep(0.5)
            return False
        return i.get("Restarts") == "1" and i.get("JobState") not in ("COMPLETING", "REQUEUED")

    wait_for("the requeued job to start again", restarted, 150, 0.05)
    info = wait_done(cluster, job)
    print(f"\npreempted job {job}: {info['JobState']} after 1 requeue in {time.monotonic() - t0:.1f}s")
    batch, node = logs(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, batch, node[-3000:])
    assert info["Restarts"] == "1", info
    # Slurm's record: the first run ended requeued after its step (the training) exited 3, the second completed.
    (first, _, first_steps), (last, last_code, _) = job_endings(cluster, job)
    assert (first, first_steps, last, last_code) == ("PENDING", "3:0", "COMPLETED", "0:0")
    # First run: stopped through the stop file, saved, exit 3, requeued; second run: resumed, finished, exit 0.
    assert batch.count("seqpar: job ") == 2 and "USR2 at" in batch, batch
    assert "training exited with status 3" in batch and f"requeueing job {job}" in batch, batch
    assert batch.rstrip().splitlines()[-1] == "seqpar: training exited with status 0", batch
    stopped = re.search(r"stop file found at step (\d+): checkpointed", node)
    assert stopped and int(stopped.group(1)) < STEPS, node[-3000:]
    k = int(stopped.group(1))
    assert re.search(rf"resumed from \S+ at step {k}\b", node), node[-3000:]
    # The loss curve of the preempted job equals the uninterrupted one, every step, exactly.
    got, want = metrics(tmp_path), metrics(uninterrupted[2])
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr"):
        assert [got[s][key] for s in got] == [want[s][key] for s in want], key
