#!/usr/bin/env python3
"""Run `python -m jaxsft.train` on every worker of a Cloud TPU VM (a pod slice), via gcloud.

    python launch/tpu_pod.py --name sft-v4-32 --zone us-central2-b --accelerator v4-32 \\
        --version tpu-ubuntu2204-base --create \\
        -- --config configs/llama3_2_3b.py --config.train.output_dir=gs://BUCKET/runs/x

Steps (each a gcloud command, printed before it runs; `--dry-run` prints them and runs nothing):
  1. create the TPU VM (`--create`), or a queued resource (`--queued`, waits until it is ACTIVE);
  2. copy this checkout to every worker and `pip install` it there (`--install`, on by default
     with `--create`; use `--install` again after changing the code);
  3. run the training command on all workers at once (`--worker=all`), streaming their output;
     every worker runs the same command, worker 0 writes logs and metrics, every worker writes
     its own checkpoint shards to the same `gs://` directory. Re-running resumes from the newest
     checkpoint there. A preempted run (SIGTERM or the TPU maintenance notice) saves its step and
     exits 75; the launch then runs the same command again (`--max-restarts`), first re-creating
     the TPU VM when it is gone and `--create` was given;
  4. delete the TPU VM (`--delete`, alone or after the run).

Only the standard library: it runs wherever gcloud does.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = "jaxsft"  # in each worker's home directory
PREEMPTED = 75  # jaxsft.cli.PREEMPTED: the run saved its step on a preemption notice


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None)
    p.add_argument("--accelerator", default="v4-8", help="accelerator type, e.g. v4-32, v5litepod-16")
    p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime version")
    p.add_argument("--create", action="store_true", help="create the TPU VM first")
    p.add_argument("--queued", action="store_true", help="create it as a queued resource and wait for it")
    p.add_argument("--spot", action="store_true", help="spot capacity (may be preempted: re-run to resume)")
    p.add_argument("--install", action="store_true", help="copy this checkout and pip install it on every worker")
    p.add_argument("--extras", default="gcs", help="package extras to install (gs:// needs gcs)")
    p.add_argument("--delete", action="store_true", help="delete the TPU VM at the end (alone: only delete)")
    p.add_argument("--max-restarts", type=int, default=10,
                   help="run the training again this many times at most when it exits 75 (preempted, step saved)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the training processes (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print every command, run none")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after `--`: the arguments of `python -m jaxsft.train` (--config ... overrides)")
    args = p.parse_args(argv)
    if args.train_args and args.train_args[0] == "--":
        args.train_args = args.train_args[1:]
    if not args.train_args and not (args.create or args.install or args.delete):
        p.error("nothing to do: give `-- --config configs/X.py ...`, or --create / --install / --delete")
    if args.train_args and "--config" not in args.train_args and not any(
            a.startswith("--config=") for a in args.train_args):
        p.error("the training arguments after `--` need --config configs/X.py")
    for e in args.env:
        if "=" not in e:
            p.error(f"--env {e!r}: expected KEY=VALUE")
    return args


def gcloud(args, *words):
    cmd = ["gcloud", "compute", "tpus", *words, f"--zone={args.zone}"]
    return cmd + ([f"--project={args.project}"] if args.project else [])


def ssh(args, remote: str):
    # --worker=all runs the command on every host of the slice at once and streams their output.
    return gcloud(args, "tpu-vm", "ssh", args.name, "--worker=all", f"--command={remote}")


def commands(args) -> list[list[str]]:
    """Every command the launch runs, in order."""
    cmds = create_and_install(args)
    if args.train_args:
        cmds.append(train_command(args))
    if args.delete:
        if args.queued:
            cmds.append(gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet"))
        else:
            cmds.append(gcloud(args, "tpu-vm", "delete", args.name, "--quiet"))
    return cmds


def train_command(args) -> list[str]:
    # JAXSFT_DISTRIBUTED=1: every worker joins the job (jax finds the others via TPU metadata).
    env = ["JAXSFT_DISTRIBUTED=1", *map(shlex.quote, args.env)]
    train = " ".join(["python3", "-m", "jaxsft.train", *map(shlex.quote, args.train_args)])
    return ssh(args, f"cd ~/{REMOTE_DIR} && {' '.join(env)} {train}")


def create_and_install(args) -> list[list[str]]:
    cmds = []
    if args.create and args.queued:
        cmds.append(gcloud(args, "queued-resources", "create", args.name, f"--node-id={args.name}",
                           f"--accelerator-type={args.accelerator}", f"--runtime-version={args.version}",
                           *(["--spot"] if args.spot else [])))
    elif args.create:
        cmds.append(gcloud(args, "tpu-vm", "create", args.name, f"--accelerator-type={args.accelerator}",
                           f"--version={args.version}", *(["--spot"] if args.spot else [])))
    if args.install or args.create:
        # A clean copy of the tracked files (git archive), unpacked on every worker.
        tarball = "/tmp/jaxsft-src.tar.gz"
        cmds.append(["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"])
        cmds.append(gcloud(args, "tpu-vm", "scp", tarball, f"{args.name}:{tarball}", "--worker=all"))
        cmds.append(ssh(args, " && ".join([
            f"rm -rf ~/{REMOTE_DIR}", f"mkdir -p ~/{REMOTE_DIR}", f"tar -xzf {tarball} -C ~/{REMOTE_DIR}",
            "python3 -m pip install -q -U pip",
            # jax[tpu] brings libtpu; the package's own dependencies follow from pyproject.toml.
            f"python3 -m pip install -q 'jax[tpu]' -e ~/{REMOTE_DIR}[{args.extras}]"])))
    return cmds


def wait_until_active(args, dry_run: bool) -> None:
    check = gcloud(args, "queued-resources", "describe", args.name, "--format=value(state.state)")
    print("+", shlex.join(check), "  # repeated until ACTIVE", flush=True)
    if dry_run:
        return
    while True:
        state = subprocess.run(check, capture_output=True, text=True).stdout.strip()
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            sys.exit(f"queued resource {args.name} is {state}")
        time.sleep(30)


def run_command(args, cmd) -> int:
    print("+", shlex.join(cmd), flush=True)
    status = 0 if args.dry_run else subprocess.run(cmd).returncode
    if cmd[3:5] == ["queued-resources", "create"]:
        wait_until_active(args, args.dry_run)
    return status


def vm_gone(args) -> bool:
    """Whether the TPU VM is no longer usable (a preempted spot VM is PREEMPTED, then deleted)."""
    describe = gcloud(args, "tpu-vm", "describe", args.name, "--format=value(state)")
    state = subprocess.run(describe, capture_output=True, text=True).stdout.strip()
    return state != "READY"


def train(args) -> int:
    """The training command, run again after each preemption (status 75) up to --max-restarts times."""
    status = run_command(args, train_command(args))
    for restart in range(args.max_restarts):
        if status != PREEMPTED:
            break
        print(f"launch: the run was preempted and saved its step; restart {restart + 1} of "
              f"{args.max_restarts}", file=sys.stderr, flush=True)
        if args.create and vm_gone(args):
            cleanup = (gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet") if args.queued
                       else gcloud(args, "tpu-vm", "delete", args.name, "--quiet"))
            subprocess.run(cleanup)
            for cmd in create_and_install(args):
                if run_command(args, cmd):
                    return status
        status = run_command(args, train_command(args))
    return status


def main(argv=None) -> int:
    args = parse(argv)
    for cmd in commands(args):
        status = train(args) if args.train_args and cmd == train_command(args) else run_command(args, cmd)
        if status:
            print(f"launch: command failed with status {status}; the TPU VM is left as it is "
                  f"(re-run to resume; --delete to remove it)", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
