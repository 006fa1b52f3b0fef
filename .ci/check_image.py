#!/usr/bin/env python3
"""Builds the serving image with scripts/build-image.sh (its no-registry path:
buildah, FROM scratch) and runs it with `buildah run --isolation chroot`,
as Kubernetes would run it: as uid/gid 65532, root filesystem read-only,
/tmp a tmpfs. Checks the entrypoint, the probes, /embed, the exit status
0 after SIGTERM within the grace period, and measures image size and cold
start (process start to ready) three ways: the built-in model, MiniLM
mounted read-only with --model-dir, and MiniLM baked into the image. The
server runs with the arguments and mounts the generated Deployment gives
it (examples/manifests), whose image and securityContext must match.

    python3 .ci/check_image.py MINILM_DIR

Exits non-zero on the first check that fails.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILDAH = ["buildah", "--storage-driver", "vfs"]
RUN_AS = 65532
MAX_IMAGE_BYTES = 25 * 1000 * 1000
MAX_BUILTIN_COLD_START = 1.0
# The server's default drain timeout (30 s) plus the 5 s the generated
# grace period adds.
GRACE_SECONDS = 35


def check(condition, what):
    if not condition:
        sys.exit(f"image check failed: {what}")
    print(f"ok: {what}")


def buildah(*args):
    return subprocess.run(
        BUILDAH + list(args), check=True, capture_output=True, text=True
    ).stdout.strip()


def build(*args):
    out = subprocess.run(
        [str(ROOT / "scripts/build-image.sh"), "--local", *args],
        check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    return out.strip().splitlines()[-1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, body=None, timeout=5):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def image_bytes(ref):
    """The image's unpacked size: every file of its root filesystem."""
    container = buildah("from", "--pull-never", ref)
    try:
        root = buildah("mount", container)
        total = sum(
            (Path(d) / f).lstat().st_size
            for d, _, files in os.walk(root) for f in files
        )
        shell = any((Path(root) / p).exists() for p in ("bin/sh", "usr/bin/sh"))
        return total, shell
    finally:
        buildah("rm", container)


def pushed_bytes(ref):
    """What a registry receives: the image as an OCI archive (gzip layers)."""
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "image.tar"
        buildah("push", "--quiet", ref, f"oci-archive:{archive}")
        return archive.stat().st_size


def generated(*flags):
    """The server container of the Deployment examples/manifests prints, and
    the model and version its labels (and a canary analysis) name."""
    out = subprocess.run(
        ["cargo", "run", "--quiet", "--example", "manifests", "--features", "k8s", "--", "--json", *flags],
        cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True,
    ).stdout
    deployment = next(i for i in json.loads(out)["items"] if i["kind"] == "Deployment")
    labels = deployment["metadata"]["labels"]
    model = (labels["candlewick.rs/model"], labels["candlewick.rs/model-version"])
    return deployment["spec"]["template"]["spec"]["containers"][0], model


def server_pid(ancestor):
    """The server process (uid 65532) below `ancestor`, once it runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            if f"Uid:\t{RUN_AS}\t" not in status:
                continue
            if (entry / "comm").read_text().strip() != "candlewick-serv":
                continue
            pid = int(entry.name)
            parent = pid
            while parent > 1:
                parent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == ancestor:
                    return pid
        except (OSError, ValueError, IndexError):
            continue
    return None


def run(ref, name, args=(), env=(), volumes=(), expect_dimension=None, expect_model=None):
    """Runs `ref` read-only as its configured user, with the container's
    `args` and `env`; returns the cold start.
    `expect_model`: the (model, version) its request metrics must carry."""
    config = json.loads(buildah("inspect", "--type", "image", ref))["OCIv1"]["config"]
    entrypoint = config["Entrypoint"]
    check(entrypoint[-2:] == ["--bind", "0.0.0.0"], f"{name}: entrypoint binds 0.0.0.0")
    check(config["User"] == f"{RUN_AS}:{RUN_AS}", f"{name}: image user is {RUN_AS}:{RUN_AS}")

    container = buildah("from", "--pull-never", ref)
    root = buildah("mount", container)
    # The mount points buildah binds over, created in the container (not
    # the image) before its root is made read-only.
    for path in ["run/.containerenv", "etc/hosts", "etc/resolv.conf", "etc/hostname"]:
        (Path(root) / path).parent.mkdir(parents=True, exist_ok=True)
        (Path(root) / path).touch()
    for path in ["dev", "proc", "sys", *(target for _, target in volumes)]:
        (Path(root) / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", root, root], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", root], check=True)
    port, admin = free_port(), free_port()
    command = [
        *BUILDAH, "run", "--isolation", "chroot", "--user", config["User"],
        "--mount", "type=tmpfs,destination=/tmp",
        *[f"--volume={source}:{target}:ro" for source, target in volumes],
        *[f"--env={var['name']}={var['value']}" for var in env],
        container, "--", *entrypoint, *args,
        "--port", str(port), "--admin-port", str(admin),
    ]
    log = tempfile.TemporaryFile()
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = None
        while time.monotonic() - started < 120 and process.poll() is None:
            try:
                if get(f"http://127.0.0.1:{admin}/readyz", timeout=1)[0] == 200:
                    ready = time.monotonic() - started
                    break
            except OSError:
                pass
            time.sleep(0.01)
        if ready is None:
            log.seek(0)
            sys.stdout.write(log.read().decode(errors="replace"))
        check(ready is not None, f"{name}: ready")
        print(f"measured: {name}: cold start (process start to /readyz 200) {ready:.3f} s")

        for probe in ["/livez", "/readyz", "/startupz"]:
            check(get(f"http://127.0.0.1:{admin}{probe}")[0] == 200, f"{name}: {probe} answers 200")
        status, body = get(f"http://127.0.0.1:{port}/embed", {"inputs": ["What is Deep Learning?"]})
        vectors = json.loads(body)
        check(status == 200 and len(vectors) == 1, f"{name}: /embed answers one embedding")
        if expect_dimension:
            check(len(vectors[0]) == expect_dimension, f"{name}: embedding has {expect_dimension} dimensions")

        if expect_model:
            metrics = get(f"http://127.0.0.1:{admin}/metrics")[1].decode()
            labels = f'model="{expect_model[0]}",version="{expect_model[1]}"'
            served = [
                line for line in metrics.splitlines()
                if line.startswith("candlewick_requests_total{") and labels in line
                and 'outcome="ok"' in line and float(line.rsplit(" ", 1)[1]) >= 1
            ]
            check(served, f"{name}: request metrics carry the manifests' {labels}")

        pid = server_pid(process.pid)
        check(pid is not None, f"{name}: the server runs as uid {RUN_AS}")
        status = (Path("/proc") / str(pid) / "status").read_text()
        check(f"Gid:\t{RUN_AS}\t" in status, f"{name}: the server runs as gid {RUN_AS}")
        mounts = [line.split() for line in (Path("/proc") / str(pid) / "mountinfo").read_text().splitlines()]
        root_options = next(m[5] for m in mounts if m[4] == "/")
        check("ro" in root_options.split(","), f"{name}: the root filesystem is read-only")

        # SIGTERM, as the kubelet sends it. buildah cannot report the exit
        # status here (its cleanup fails on the read-only root), so hold the
        # server's parent and read the status from the unreaped process.
        parent = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(parent, signal.SIGSTOP)
        try:
            signalled = time.monotonic()
            os.kill(pid, signal.SIGTERM)
            stat = Path("/proc") / str(pid) / "stat"
            while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                check(time.monotonic() - signalled < GRACE_SECONDS, f"{name}: exits within {GRACE_SECONDS} s of SIGTERM")
                time.sleep(0.01)
            stopped = time.monotonic() - signalled
            exit_code = int(stat.read_text().rsplit(")", 1)[1].split()[49])
        finally:
            os.kill(parent, signal.SIGCONT)
        check(exit_code == 0, f"{name}: exit status 0 after SIGTERM ({stopped:.3f} s)")
        process.wait(timeout=30)
        return ready
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        subprocess.run(["umount", root], check=False)
        subprocess.run(BUILDAH + ["rm", container], check=False, capture_output=True)


def main():
    minilm = Path(sys.argv[1]).resolve()
    check((minilm / "config.json").is_file(), f"MiniLM at {minilm}")

    builtin = build()
    size, shell = image_bytes(builtin)
    print(f"measured: image {builtin}: {size / 1e6:.1f} MB unpacked, {pushed_bytes(builtin) / 1e6:.1f} MB pushed")
    check(size <= MAX_IMAGE_BYTES, f"image is at most {MAX_IMAGE_BYTES / 1e6:.0f} MB")
    check(not shell, "image has no shell")

    # Not the server's default version: the server must take it from the
    # Deployment's environment for its metrics to carry it.
    container, model = generated("--model-version", "7")
    check(model[1] == "7", "the manifests label the version they were given")
    check(container["image"] == builtin, "the manifests default to the image the script builds")
    security = container["securityContext"]
    user = json.loads(buildah("inspect", "--type", "image", builtin))["OCIv1"]["config"]["User"]
    check(f"{security['runAsUser']}:{security['runAsGroup']}" == user, "the manifests run as the image's user")
    check(security["readOnlyRootFilesystem"], "the manifests make the root filesystem read-only")
    cold_start = run(builtin, "built-in model", args=container.get("args", []),
                     env=container.get("env", []), expect_dimension=128, expect_model=model)
    check(cold_start < MAX_BUILTIN_COLD_START, f"built-in model ready within {MAX_BUILTIN_COLD_START} s")

    container, model = generated("--model", minilm.name, "--model-claim", "weights")
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "model")
    run(builtin, "MiniLM mounted", args=container.get("args", []), env=container.get("env", []),
        volumes=[(str(minilm), mount)], expect_dimension=384, expect_model=model)

    baked = build("--model-dir", str(minilm))
    size, _ = image_bytes(baked)
    print(f"measured: image {baked}: {size / 1e6:.1f} MB unpacked")
    run(baked, "MiniLM baked in", expect_dimension=384)
    # Rebuilding a tag leaves the previous image untagged.
    buildah("rmi", "--prune")


if __name__ == "__main__":
    main()
