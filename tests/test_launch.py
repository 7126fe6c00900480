"""launch/tpu.sh: the gcloud commands it prints in --dry-run, that it runs exactly those, and that
the remote command lines survive two layers of shell quoting (checked by running them locally).

No network and no gcloud: dry runs get a PATH without gcloud, real runs a fake gcloud that records
its argv.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "tpu.sh"
BASH = shutil.which("bash")
LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
CONFIG_VARS = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "RUN_NAME",
               "MODEL_DIR", "BUCKET", "REPO", "REF", "REMOTE_DIR", "REMOTE_PYTHON", "JAX_SPEC",
               "WORKER", "TMPDIR")
LOC = ["--zone=us-central2-b", "--project=proj"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "midas-tpu", *LOC]

# Gin values that need quoting, with the trainer's own syntax (quotes, brackets, parentheses),
# and a pass-through argument full of characters special to shells.
STAGES = "--gin.STAGES=[(4, 100), (8, 300)]"
MODEL_DIR_OVERRIDE = "--gin.MODEL_DIR='gs://b/r'"
MESH = "--gin.midas_jax.sharding.make_mesh.fsdp=-1"
NASTY = """--gin_bindings=x = "it's $HOME `id` \\n; & | ! * ~" """
DIST = "--gin.midas_jax.sharding.initialize_distributed.enabled=True"
# An experiment file and the schedule file that goes after it (the experiment leaves it open).
EXPERIMENT = "gin/experiments/decoder_1b.gin"
SCHEDULE = "gin/schedules/midas_prop1.gin"


@pytest.fixture(scope="module")
def no_gcloud_path(tmp_path_factory):
  """A PATH holding only what the script needs besides bash builtins: no gcloud, no git."""
  bin_dir = tmp_path_factory.mktemp("bin")
  for tool in ("bash", "dirname", "cat"):
    (bin_dir / tool).symlink_to(shutil.which(tool))
  return str(bin_dir)


def tpu(*args, path, extra_env=None, stdin=subprocess.DEVNULL, input=None, base=True):
  env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}
  env["PATH"] = path
  if base:
    env.update(TPU_NAME="midas-tpu", ZONE="us-central2-b", PROJECT="proj")
  env.update(extra_env or {})
  return subprocess.run([BASH, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                        timeout=30, input=input, stdin=None if input is not None else stdin)


def dry(*args, path, **kw):
  """Parsed command lines of a successful dry run."""
  r = tpu("--dry-run", *args, path=path, **kw)
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines()]


def payload(argv):
  (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return cmd


def simple_commands(script):
  """The remote script as a list of simple commands (split at ; && || & |), shell-unquoted."""
  lex = shlex.shlex(script, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  out, cur = [], []
  for tok in lex:
    if tok in (";", "&&", "||", "&", "|"):
      out.append(cur)
      cur = []
    else:
      cur.append(tok)
  return [c for c in out + [cur] if c]


def trainer_argv(script):
  """The trainer's argv in a `run` payload: the nohup command up to its redirections."""
  (cmd,) = [c for c in simple_commands(script) if c[0] == "nohup"]
  return cmd[1:cmd.index(">>")]


# --- usage and errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["-h"], ["run", "--help"], ["--dry-run", "-h"]])
def test_help_exits_0(no_gcloud_path, args):
  r = tpu(*args, path=no_gcloud_path, base=False)
  assert r.returncode == 0 and r.stdout.startswith("usage: launch/tpu.sh")
  for sub in ("create", "status", "setup", "run", "logs", "stop", "delete", "--dry-run"):
    assert sub in r.stdout


@pytest.mark.parametrize("args, message", [
    (["launch"], "unknown subcommand: launch"),
    ([], "no subcommand given"),
    (["--bogus", "status"], "unknown flag before the subcommand: --bogus"),
    (["run", "--bogus"], "unknown run flag: --bogus"),
    (["create", "--accelerator-type", "v4-8", "--spot", "--reserved"], "--reserved excludes --spot"),
    (["setup", "--ref", "main"], "--ref needs --repo"),
    (["logs", "--run-name"], "--run-name needs a value"),
    (["run", "--gin", "NO_EQUALS"], "--gin takes NAME=VALUE"),
])
def test_usage_errors_exit_2(no_gcloud_path, args, message):
  r = tpu("--dry-run", *args, path=no_gcloud_path)
  assert r.returncode == 2 and r.stdout == ""
  assert "usage: launch/tpu.sh" in r.stderr and message in r.stderr


@pytest.mark.parametrize("args, unset, names", [
    (["status"], "TPU_NAME", "pass --name my-tpu or export TPU_NAME=my-tpu"),
    (["status"], "ZONE", "pass --zone"),
    (["status"], "PROJECT", "pass --project"),
    (["create"], None, "ACCELERATOR_TYPE is not set: pass --accelerator-type"),
    (["create", "--accelerator-type", "v9-8"], None, "RUNTIME_VERSION"),
    (["run", "--gin-file", EXPERIMENT, "--bucket", "gs://b"], None, "RUN_NAME is not set"),
    (["run", "--run-name", "r", "--gin-file", EXPERIMENT], None, "MODEL_DIR is not set"),
    (["run", "--run-name", "r", "--bucket", "gs://b"], None, "--gin-file"),
    (["run", "--run-name", "a b", "--bucket", "gs://b", "--gin-file", EXPERIMENT], None, "run name"),
    (["logs"], None, "RUN_NAME is not set"),
    (["stop"], None, "RUN_NAME is not set"),
])
def test_missing_config_is_named(no_gcloud_path, args, unset, names):
  env = {k: v for k, v in dict(TPU_NAME="midas-tpu", ZONE="us-central2-b", PROJECT="proj").items()
         if k != unset}
  r = tpu("--dry-run", *args, path=no_gcloud_path, base=False, extra_env=env)
  assert r.returncode == 2 and r.stdout == ""
  assert names in r.stderr and (unset is None or unset in r.stderr)


# --- the printed commands -----------------------------------------------------------------------

def test_create(no_gcloud_path):
  qr = ["gcloud", "compute", "tpus", "queued-resources", "create", "midas-tpu",
        "--node-id=midas-tpu", *LOC]
  assert dry("create", "--accelerator-type", "v4-32", "--spot", path=no_gcloud_path) == [
      [*qr, "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"]]
  assert dry("create", "--reserved", path=no_gcloud_path,
             extra_env={"ACCELERATOR_TYPE": "v5litepod-16"}) == [
      [*qr, "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
       "--reserved"]]
  # --best-effort is alpha-only; runtime override and extra gcloud flags after --.
  (argv,) = dry("create", "--accelerator-type=v6e-8", "--best-effort", "--runtime-version=rt",
                "--", "--valid-until-duration=6h", path=no_gcloud_path)
  assert argv == ["gcloud", "alpha", *qr[1:], "--accelerator-type=v6e-8", "--runtime-version=rt",
                  "--best-effort", "--valid-until-duration=6h"]


def test_status_and_delete(no_gcloud_path):
  assert dry("status", path=no_gcloud_path) == [
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "midas-tpu", *LOC],
      ["gcloud", "compute", "tpus", "tpu-vm", "describe", "midas-tpu", *LOC]]
  # A dry run never prompts.
  assert dry("delete", path=no_gcloud_path) == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "midas-tpu", *LOC, "--force",
       "--quiet"]]


def test_global_flags_anywhere(no_gcloud_path):
  (argv,) = dry("logs", "--zone", "europe-west4-a", "--run-name=r1", "--name=other",
                "--project", "p2", path=no_gcloud_path)
  assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "other",
                      "--zone=europe-west4-a", "--project=p2"]


def test_setup_copies_head(no_gcloud_path, tmp_path):
  lines = dry("setup", path=no_gcloud_path, extra_env={"TMPDIR": str(tmp_path)})
  tarball = f"{tmp_path}/midas_jax-midas-tpu.tar.gz"
  assert lines[0] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
  assert lines[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                      "midas-tpu:midas_jax-src.tar.gz", *LOC, "--worker=all"]
  assert lines[2][:-1] == [*SSH, "--worker=all"] and len(lines) == 3
  cmds = simple_commands(payload(lines[2]))
  for expected in (["tar", "-xzf", "midas_jax-src.tar.gz", "-C", "midas_jax"],
                   ["python3.11", "-m", "venv", ".venv"],
                   [".venv/bin/python", "-m", "pip", "install", "-q", "-e", "."],
                   [".venv/bin/python", "-m", "pip", "install", "-q", "-U", "jax[tpu]", "-f", LIBTPU]):
    assert expected in cmds


def test_setup_from_repo(no_gcloud_path):
  (argv,) = dry("setup", "--repo", "https://github.com/me/midas_jax.git", "--ref", "v1",
                "--python", "python3.12", "--remote-dir", "code dir", path=no_gcloud_path)
  cmds = simple_commands(payload(argv))
  assert ["git", "-C", "code dir", "fetch", "-q", "--depth=1",
          "https://github.com/me/midas_jax.git", "v1"] in cmds
  assert ["python3.12", "-m", "venv", ".venv"] in cmds and ["cd", "code dir"] in cmds


def test_run_keeps_gin_overrides_byte_for_byte(no_gcloud_path):
  (argv,) = dry("run", "--run-name", "1b-prop1", "--bucket", "gs://my-bucket/",
                "--gin-file", EXPERIMENT, f"--gin_file={SCHEDULE}", MESH, STAGES,
                "--gin", "MODEL_DIR='gs://b/r'", "--", NASTY, "--dry-run", path=no_gcloud_path)
  assert argv[:-1] == [*SSH, "--worker=all"]
  script = payload(argv)
  assert trainer_argv(script) == [
      ".venv/bin/python", "-u", "-m", "midas_jax.train", f"--gin_file={EXPERIMENT}",
      f"--gin_file={SCHEDULE}", "--gin.MODEL_DIR='gs://my-bucket/runs/1b-prop1'", DIST, MESH,
      STAGES, MODEL_DIR_OVERRIDE, NASTY, "--dry-run"]
  (nohup,) = [c for c in simple_commands(script) if c[0] == "nohup"]
  assert nohup[-7:] == [">>", "logs/1b-prop1.log", "2", ">&", "1", "<", "/dev/null"]
  assert "& echo $! > logs/1b-prop1.pid" in script


def test_run_model_dir_and_no_distributed(no_gcloud_path):
  (argv,) = dry("run", "--no-distributed", "--gin-file", EXPERIMENT, path=no_gcloud_path,
                extra_env={"RUN_NAME": "r", "MODEL_DIR": "./local dir", "BUCKET": "gs://ignored"})
  assert trainer_argv(payload(argv))[4:] == [f"--gin_file={EXPERIMENT}",
                                             "--gin.MODEL_DIR='./local dir'"]


def test_logs_and_stop(no_gcloud_path):
  (argv,) = dry("logs", "--run-name", "r1", path=no_gcloud_path)
  assert argv == [*SSH, "--worker=0", "--command=tail -n 100 -F midas_jax/logs/r1.log"]
  (argv,) = dry("logs", "--run-name", "r1", "--worker", "3", "--lines", "5", "--no-follow",
                path=no_gcloud_path)
  assert argv == [*SSH, "--worker=3", "--command=tail -n 5 midas_jax/logs/r1.log"]
  (argv,) = dry("stop", "--run-name", "r1", path=no_gcloud_path)
  assert argv[:-1] == [*SSH, "--worker=all"]
  assert 'kill -TERM "$pid"' in payload(argv) and "$(cat midas_jax/logs/r1.pid" in payload(argv)


# --- what runs is what a dry run prints ---------------------------------------------------------

@pytest.fixture
def fake_gcloud(tmp_path):
  """A gcloud that appends its argv (JSON, one call a line) to a file; returns (PATH, calls)."""
  bin_dir, log = tmp_path / "fakebin", tmp_path / "gcloud_calls.jsonl"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
  gcloud.chmod(0o755)

  def calls():
    if not log.exists():
      return []
    out = [json.loads(line) for line in log.read_text().splitlines()]
    log.unlink()
    return out
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", calls


@pytest.mark.parametrize("args", [
    ["create", "--accelerator-type", "v4-32", "--spot", "--", "--description=a b"],
    ["status"],
    ["setup"],
    ["setup", "--repo", "https://example.com/r.git"],
    ["run", "--run-name", "r1", "--model-dir", "gs://b/x", "--gin-file", EXPERIMENT, MESH, STAGES,
     "--", NASTY],
    ["logs", "--run-name", "r1", "--no-follow"],
    ["stop", "--run-name", "r1", "--timeout", "0"],
    ["delete", "--yes"],
])
def test_runs_exactly_what_dry_run_prints(no_gcloud_path, fake_gcloud, tmp_path, args):
  path, calls = fake_gcloud
  env = {"TMPDIR": str(tmp_path)}
  printed = dry(*args, path=no_gcloud_path, extra_env=env)
  r = tpu(*args, path=path, extra_env=env)
  assert r.returncode == 0, r.stderr
  assert calls() == [argv[1:] for argv in printed if argv[0] == "gcloud"]
  echoed = [shlex.split(line[2:]) for line in r.stderr.splitlines() if line.startswith("+ ")]
  assert echoed == printed
  if args == ["setup"]:  # the tarball really holds the package
    with tarfile.open(tmp_path / "midas_jax-midas-tpu.tar.gz") as tar:
      assert {"setup.py", "midas_jax/train.py", EXPERIMENT, SCHEDULE} <= set(tar.getnames())


def test_dry_run_after_double_dash_goes_to_the_trainer(fake_gcloud):
  path, calls = fake_gcloud
  r = tpu("run", "--run-name", "r", "--bucket", "gs://b", "--gin-file", EXPERIMENT, "--",
          "--dry-run", path=path)
  assert r.returncode == 0 and r.stdout == ""
  (argv,) = calls()
  assert trainer_argv(payload(argv))[-1] == "--dry-run"


def test_delete_asks_first(fake_gcloud):
  path, calls = fake_gcloud
  r = tpu("delete", path=path, input="n\n")
  assert r.returncode == 1 and "not deleted" in r.stderr and calls() == []
  assert "Delete queued resource midas-tpu" in r.stderr
  assert tpu("delete", path=path).returncode == 1 and calls() == []  # no answer: no deletion
  assert tpu("delete", path=path, input="y\n").returncode == 0
  assert calls() == [["compute", "tpus", "queued-resources", "delete", "midas-tpu", *LOC,
                      "--force", "--quiet"]]


# --- the remote side, run locally ---------------------------------------------------------------

FAKE_TRAINER = """#!/usr/bin/env bash
# Stands in for .venv/bin/python: records its argv, then waits for SIGTERM like the trainer.
printf '%s\\0' "$@" > "$HOME/argv.tmp" && mv "$HOME/argv.tmp" "$HOME/argv"
echo "fake trainer up"
trap 'echo "checkpoint saved" > "$HOME/term"; exit 0' TERM
while :; do sleep 0.05; done
"""


class _Reaper:
  """Adopt the background trainer and reap it when it exits, so `kill -0` stops seeing it even
  where PID 1 does not reap orphans (some containers). Linux only; a no-op elsewhere."""

  def __enter__(self):
    self.libc = None
    if sys.platform.startswith("linux"):
      import ctypes  # pylint: disable=import-outside-toplevel
      self.libc = ctypes.CDLL(None, use_errno=True)
      self.libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER on
    return self

  def __exit__(self, *exc):
    if self.libc is not None:
      self.libc.prctl(36, 0, 0, 0, 0)

  @staticmethod
  def reap_later(pid):
    def wait():
      try:
        os.waitpid(pid, 0)
      except ChildProcessError:  # not ours (no subreaper): init reaps it
        pass
    threading.Thread(target=wait, daemon=True).start()


def _alive(pid):
  try:
    os.kill(pid, 0)
    return True
  except ProcessLookupError:
    return False


def _wait_for(cond, timeout=5.0):
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if cond():
      return True
    time.sleep(0.02)
  return False


def test_remote_run_logs_stop_payloads(no_gcloud_path, tmp_path):
  """The run/logs/stop payloads, run by bash as one worker would: the trainer gets the exact
  argv, runs in the background, logs to its file, refuses a second start, and stops on SIGTERM."""
  home = tmp_path / "home"
  venv_bin = home / "my code" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text(FAKE_TRAINER)
  (venv_bin / "python").chmod(0o755)
  env = {**os.environ, "HOME": str(home)}
  common = ["--remote-dir", "my code"]

  def remote(*args):
    (argv,) = dry(*common, *args, path=no_gcloud_path)
    return subprocess.run([BASH, "-c", payload(argv)], cwd=home, env=env, capture_output=True,
                          text=True, timeout=20)

  run = ["run", "--run-name", "r1", "--bucket", "gs://b", "--gin-file", EXPERIMENT,
         "--gin-file", SCHEDULE, MESH, STAGES,
         "--gin", "MODEL_DIR='gs://b/r'", "--", NASTY]
  pid_file = home / "my code" / "logs" / "r1.pid"
  try:
    with _Reaper():  # the orphaned trainer is adopted when the payload's shell exits
      r = remote(*run)
    assert r.returncode == 0 and "started r1" in r.stdout, r.stderr
    _Reaper.reap_later(int(pid_file.read_text()))
    assert _wait_for((home / "argv").exists)
    assert (home / "argv").read_text().split("\0")[:-1] == [
        "-u", "-m", "midas_jax.train", f"--gin_file={EXPERIMENT}", f"--gin_file={SCHEDULE}",
        "--gin.MODEL_DIR='gs://b/runs/r1'", DIST, MESH, STAGES, MODEL_DIR_OVERRIDE, NASTY]
    pid = int(pid_file.read_text())
    assert _alive(pid)
    again = remote(*run)
    assert again.returncode == 1 and "r1 is already running" in again.stderr
    assert _wait_for(lambda: "fake trainer up" in remote("logs", "--run-name", "r1",
                                                         "--no-follow").stdout)
    stop = remote("stop", "--run-name", "r1", "--timeout", "5")
    assert stop.returncode == 0 and "r1 stopped" in stop.stdout, stop.stderr
    assert (home / "term").read_text() == "checkpoint saved\n" and not _alive(pid)
    assert "r1 is not running" in remote("stop", "--run-name", "r1").stdout
  finally:
    if pid_file.exists() and _alive(int(pid_file.read_text())):
      os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_remote_run_without_setup_says_so(no_gcloud_path, tmp_path):
  (argv,) = dry("run", "--run-name", "r", "--bucket", "gs://b", "--gin-file", EXPERIMENT,
                path=no_gcloud_path)
  r = subprocess.run([BASH, "-c", payload(argv)], cwd=tmp_path, capture_output=True, text=True,
                     env={**os.environ, "HOME": str(tmp_path)}, timeout=10)
  assert r.returncode == 1 and "run launch/tpu.sh setup first" in r.stderr


# --- the AOT check before a slice is paid for ----------------------------------------------------

@pytest.fixture
def fake_aot(tmp_path):
  """A LOCAL_PYTHON that records its argv and exits with $FAKE_AOT_RC (3: does not fit)."""
  py, log = tmp_path / "python", tmp_path / "aot_calls.jsonl"
  py.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                "sys.exit(int(os.environ.get('FAKE_AOT_RC', '0')))\n")
  py.chmod(0o755)
  calls = lambda: [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
  return str(py), calls


def test_check_runs_the_aot_tool_here_without_slice_settings(fake_aot, no_gcloud_path):
  py, calls = fake_aot
  r = tpu("check", "--accelerator-type", "v5p-256", "--num-slices", "2", "--gin-file", EXPERIMENT,
          "--gin-file", SCHEDULE, "--gin", "BATCH_SIZE=128", path=no_gcloud_path, base=False,
          extra_env={"LOCAL_PYTHON": py})
  assert r.returncode == 0, r.stderr
  assert calls() == [["-m", "midas_jax.aot", "--topology=v5p-256", "--num_slices=2",
                      f"--gin_file={EXPERIMENT}", f"--gin_file={SCHEDULE}", "--gin.BATCH_SIZE=128"]]
  r = tpu("check", "--gin-file", EXPERIMENT, path=no_gcloud_path, base=False,
          extra_env={"LOCAL_PYTHON": py, "FAKE_AOT_RC": "3"})
  assert r.returncode == 2 and "ACCELERATOR_TYPE is not set" in r.stderr
  r = tpu("check", "--accelerator-type", "v5p-256", "--gin-file", EXPERIMENT,
          path=no_gcloud_path, base=False, extra_env={"LOCAL_PYTHON": py, "FAKE_AOT_RC": "3"})
  assert r.returncode == 3


@pytest.mark.parametrize("cmd", [
    ["create", "--accelerator-type", "v5p-256", "--gin-file", EXPERIMENT, "--gin-file", SCHEDULE],
    ["run", "--run-name", "r1", "--model-dir", "gs://b/x", "--accelerator-type", "v5p-256",
     "--gin-file", EXPERIMENT, "--gin-file", SCHEDULE]])
def test_create_and_run_refuse_a_run_that_does_not_fit(fake_aot, fake_gcloud, tmp_path, cmd):
  py, aot_calls = fake_aot
  path, calls = fake_gcloud
  env = {"LOCAL_PYTHON": py, "FAKE_AOT_RC": "3", "TMPDIR": str(tmp_path)}
  r = tpu(*cmd, path=path, extra_env=env)
  assert r.returncode == 3 and "does not fit on a v5p-256" in r.stderr and "--force" in r.stderr
  assert calls() == [] and aot_calls()[0][:3] == ["-m", "midas_jax.aot", "--topology=v5p-256"]
  r = tpu(*cmd, "--force", path=path, extra_env=env)
  assert r.returncode == 0, r.stderr
  assert calls() and len(aot_calls()) == 1  # forced: no second check, gcloud called
  r = tpu(*cmd, path=path, extra_env={**env, "FAKE_AOT_RC": "0"})
  assert r.returncode == 0 and calls() and len(aot_calls()) == 2
