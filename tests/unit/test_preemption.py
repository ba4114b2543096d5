"""Stop signals that arrive before the training loop: remembered from process start (train.py), adopted by the
loop's StopRequest (so the run stops after its first step with a checkpoint), a second Ctrl-C still interrupts.
In a child process: signal handlers are process-wide."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = """
import os, signal
from seqpar.train.preemption import StopRequest, catch_early
release = catch_early()
os.kill(os.getpid(), signal.SIGTERM)  # during 'setup': not fatal, remembered
stop = StopRequest().install()
assert stop.local_code() == 3 and stop.poll() == "signal received"
stop.restore()
again = StopRequest().install()  # adopted once: a later StopRequest starts clean
assert again.local_code() == 0
again.restore()
os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C: remembered
try:
    os.kill(os.getpid(), signal.SIGINT)  # second: interrupts
    raise SystemExit("a second Ctrl-C must interrupt")
except KeyboardInterrupt:
    pass
release()
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
print("ok")
"""


def test_a_stop_signal_during_setup_is_kept_for_the_loop():
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
