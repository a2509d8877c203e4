"""Build the CPU image and check it the way SageMaker uses it: `<engine> run <image> serve`.

    python tests/container/local_container_check.py --model-dir DIR [--base-image IMAGE | --make-base]
        [--podman-config private] [--cleanup]
        [--wheels DIR] [--ca-bundle FILE] [--engine podman|docker] [--report FILE]

Steps, each timed: (optionally) make a Debian base image from Debian's packages with mmdebstrap; build the
CPU image from this repository's Dockerfile (`--build-arg VARIANT=cpu`, the base through
`--build-arg CPU_IMAGE=...`); run it with DIR mounted read-only at /opt/ml/model and `OPTION_*` variables;
then check
  - GET /ping turns 200 (and the image's HEALTHCHECK command says healthy),
  - POST /invocations answers "The capital of France is Paris." (DIR holds the embedded SmolLM2-135M-Instruct,
    see below; greedy decoding, so the answer is fixed),
  - POST /v1/chat/completions answers with Paris,
  - the OPTION_* variable is in the configuration the container resolves (`plan --json` inside it),
  - every process in the container runs as the image's non-root UID,
  - `<engine> stop` while requests are in flight: short ones get their full answer, long ones (past the
    grace period) their full answer or an error in the documented JSON shape (never a dropped connection or
    a bare 500), and the server exits 0, all within SageMaker's 30 s.
Exit status 0 when every check passed. Not part of `pytest` (a build takes minutes); the Dockerfile checks
that need no build are tests/unit/test_container_image.py.

The model directory: the embedded model converted once on the host,
    python -c "from pathlib import Path; from entrypoint.embedded_model import ensure_embedded_model; \
print(ensure_embedded_model(Path('~/.cache/lmi-deepspeed').expanduser()))"
prints it. `--wheels DIR` offers a directory of wheels to pip inside the build (e.g. a local CPU torch
wheel when PyPI-only networks cannot reach PyTorch's index; then also `--torch-index-url`), and
`--ca-bundle FILE` passes a CA bundle for pip as a build secret (never stored in the image).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
EXPECTED_ANSWER = "The capital of France is Paris."
SAGEMAKER_STOP_SECONDS = 30  # SageMaker (and `docker stop`'s -t here) kill the container after this
STARTUP_TIMEOUT_SECONDS = 900  # generous: a loaded 2-core machine loads the 135M model in well under this
MAX_ROLLING_BATCH_SIZE = "4"  # an OPTION_* value the check expects the container's configuration to resolve
#: the CPU image's base: the official Python image, or with --make-base one made here from Debian's packages,
#: under a name of its own so that it never shadows the official image
OFFICIAL_BASE_IMAGE = "python:3.11-slim-bookworm"
MADE_BASE_IMAGE = "localhost/lmi-debian-base:bookworm"
FALLBACK_DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: podman's settings for hosts without a container daemon's usual set-up (shared/FACTS.md, measured
#: 2026-11-30): vfs storage (no overlay mounts), runc (crun cannot set rlimits under cgroups hybrid mode)
#: and explicit nofile/nproc limits
PODMAN_STORAGE_CONF = """[storage]
driver = "vfs"
graphroot = "{root}/storage"
runroot = "{root}/run"
"""
PODMAN_CONTAINERS_CONF = """[engine]
runtime = "runc"

[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
"""


class CheckFailed(AssertionError):
    pass


class Report:
    """Timed steps; printed as they finish and written as JSON with --report."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def step(self, name: str, action: Callable[[], str | None]) -> None:
        print(f"--- {name}", flush=True)
        started = time.monotonic()
        try:
            detail = action() or ""
        except Exception as error:
            seconds = time.monotonic() - started
            detail = str(error).split("\nlogs")[0]  # the logs are printed in full at the end, not in the table
            self.steps.append({"step": name, "ok": False, "seconds": round(seconds, 1), "detail": detail})
            print(f"FAIL {name} ({seconds:.1f} s): {error}", flush=True)
            raise
        seconds = time.monotonic() - started
        self.steps.append({"step": name, "ok": True, "seconds": round(seconds, 1), "detail": detail})
        print(f"ok   {name} ({seconds:.1f} s) {detail}", flush=True)

    def table(self) -> str:
        lines = ["| step | result | seconds | detail |", "|---|---|---|---|"]
        for row in self.steps:
            detail = str(row["detail"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {row['step']} | {'ok' if row['ok'] else 'FAILED'} | {row['seconds']} | {detail} |")
        return "\n".join(lines)


def run(command: list[str], *, check: bool = True, capture: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, text=True, capture_output=capture, **kwargs)
    if check and result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "") if capture else ""
        raise CheckFailed(f"`{' '.join(command[:3])} ...` exited {result.returncode}: {output[-3000:]}")
    return result


def http(method: str, url: str, body: dict | None = None, timeout: float = 600) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ContainerCheck:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.engine = args.engine
        self.name = f"lmi-check-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.report = Report()
        self.made: list[str] = []  # images this run created (reported at the end; removed with --cleanup)

    # ---- steps ----------------------------------------------------------------------------------------
    def make_base(self) -> str:
        """A Debian bookworm base from Debian's own packages (no registry needed), as FACTS.md records."""
        if run([self.engine, "image", "exists", self.args.base_image], check=False).returncode == 0:
            return f"{self.args.base_image} exists; kept"
        mirror = self.args.debian_mirror
        script = (f"mmdebstrap --mode=root --variant=minbase --format=tar "
                  f"--include=python3,python3-venv,python3-pip,ca-certificates bookworm - 'deb {mirror} bookworm main' "
                  f"| {self.engine} import - {self.args.base_image}")
        run(["bash", "-o", "pipefail", "-c", script])
        self.made.append(self.args.base_image)
        return f"made {self.args.base_image} from {mirror}"

    def build(self) -> str:
        command = [self.engine, "build", "-f", str(REPO / "Dockerfile"), "-t", self.args.image,
                   "--build-arg", "VARIANT=cpu", "--build-arg", f"CPU_IMAGE={self.args.base_image}",
                   "--build-arg", f"EMBEDDED_MODEL={'true' if self.args.embedded_model else 'false'}"]
        if self.args.torch_index_url:
            command += ["--build-arg", f"TORCH_INDEX_URL={self.args.torch_index_url}"]
        if self.args.wheels:
            command += ["--build-context", f"wheels={self.args.wheels}"]
        if self.args.ca_bundle:
            command += ["--secret", f"id=cacert,src={self.args.ca_bundle}"]
        if self.engine == "podman":
            # docker format keeps HEALTHCHECK (OCI has no field for it); one layer per stage is much faster
            # on the vfs storage driver, which copies the whole file system for every layer.
            command += ["--format", "docker", "--layers=false"]
        command += self.args.build_option + [str(self.args.context)]
        run(command, capture=False)
        self.made.append(self.args.image)
        size = run([self.engine, "image", "inspect", self.args.image, "--format", "{{.Size}}"]).stdout.strip()
        return f"{self.args.image}, {int(size) / 1e6:.0f} MB" if size.isdigit() else self.args.image

    def start(self) -> str:
        command = [self.engine, "run", "-d", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8080",
                   "-v", f"{Path(self.args.model_dir).resolve()}:/opt/ml/model:ro",
                   "-e", f"OPTION_MAX_ROLLING_BATCH_SIZE={MAX_ROLLING_BATCH_SIZE}",
                   "-e", "OPTION_MODEL_LOADING_TIMEOUT=900"]
        command += self.args.run_option + [self.args.image, "serve"]
        run(command)
        return f"container {self.name}, port 127.0.0.1:{self.port}"

    def wait_healthy(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        last = ""
        while time.monotonic() < deadline:
            if not self.running():
                raise CheckFailed(f"the container exited before /ping was healthy; logs:\n{self.logs()[-3000:]}")
            try:
                status, body = http("GET", f"{self.base}/ping", timeout=5)
                if status == 200:
                    return body
                last = f"{status} {body[:200]}"
            except OSError as error:
                last = str(error)
            time.sleep(1)
        raise CheckFailed(f"/ping not healthy within {STARTUP_TIMEOUT_SECONDS} s (last: {last})")

    def healthcheck(self) -> str:
        # The image's HEALTHCHECK command, run the way Docker runs it (inside the container).
        result = run([self.engine, "exec", self.name, "/opt/venv/bin/python", "-m", "entrypoint.healthcheck"])
        return result.stdout.strip()

    def invocations(self) -> str:
        status, body = http("POST", f"{self.base}/invocations",
                            {"inputs": CHAT_PROMPT, "parameters": {"max_new_tokens": 20, "do_sample": False}})
        if status != 200 or json.loads(body).get("generated_text") != EXPECTED_ANSWER:
            raise CheckFailed(f"/invocations answered {status} {body!r}, expected {EXPECTED_ANSWER!r}")
        return body

    def chat(self) -> str:
        status, body = http("POST", f"{self.base}/v1/chat/completions",
                            {"model": "model", "max_tokens": 20, "temperature": 0,
                             "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        content = json.loads(body)["choices"][0]["message"]["content"] if status == 200 else ""
        if "Paris" not in content:
            raise CheckFailed(f"/v1/chat/completions answered {status} {body!r}, expected an answer naming Paris")
        return content

    def option_applied(self) -> str:
        # The configuration as the server resolves it, in the container's own environment and model mount.
        result = run([self.engine, "exec", self.name, "/opt/venv/bin/python", "-m", "entrypoint", "plan", "--json"])
        setting = json.loads(result.stdout)["properties"]["max_rolling_batch_size"]
        expected = {"value": int(MAX_ROLLING_BATCH_SIZE), "source": "environment variable OPTION_MAX_ROLLING_BATCH_SIZE"}
        if setting != expected:
            raise CheckFailed(f"max_rolling_batch_size resolved in the container to {setting}, expected {expected}")
        return f"max_rolling_batch_size={setting['value']} from {setting['source']}"

    def non_root(self) -> str:
        # Real and effective UID of every process (PID 1 = dumb-init, the server, anything it started).
        result = run([self.engine, "exec", self.name, "sh", "-c",
                      'for s in /proc/[0-9]*/status; do printf "%s %s\\n" "$s" "$(grep ^Uid: "$s")"; done'])
        uids = {}
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 4:
                uids[parts[0].split("/")[2]] = {parts[2], parts[3]}
        image_user = run([self.engine, "image", "inspect", self.args.image, "--format", "{{.Config.User}}"]).stdout.strip()
        bad = {pid: ids for pid, ids in uids.items() if ids != {image_user}}
        if not uids or not image_user.isdigit() or image_user == "0" or bad:
            raise CheckFailed(f"image USER {image_user!r}; processes not running as it: {bad or uids}")
        return f"{len(uids)} processes, all UID {image_user}"

    def stop_drains(self) -> str:
        """SIGTERM with work in flight: short requests must be answered in full; long ones (2000 tokens, past
        the server's grace period on a CPU) in full or with an error in the documented shape; exit 0 < 30 s."""
        results: dict[str, tuple[int, str] | BaseException] = {}

        def call(key: str, path: str, body: dict) -> None:
            try:
                results[key] = http("POST", f"{self.base}{path}", body, timeout=120)
            except BaseException as error:  # noqa: BLE001 - a dropped connection; judged below
                results[key] = error

        long_body = {"model": "model", "prompt": CHAT_PROMPT, "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
        short_body = {"inputs": CHAT_PROMPT, "parameters": {"max_new_tokens": 8, "do_sample": False}}
        threads = [threading.Thread(target=call, args=(f"long-{i}", "/v1/completions", long_body)) for i in range(2)]
        for thread in threads:
            thread.start()
        self.wait_in_flight(2)
        shorts = [threading.Thread(target=call, args=(f"short-{i}", "/invocations", short_body)) for i in range(2)]
        for thread in shorts:
            thread.start()
        threads += shorts
        self.wait_in_flight(3)
        started = time.monotonic()
        run([self.engine, "stop", "-t", str(SAGEMAKER_STOP_SECONDS), self.name])
        stop_seconds = time.monotonic() - started
        for thread in threads:
            thread.join(timeout=120)
        exit_code = run([self.engine, "inspect", self.name, "--format", "{{.State.ExitCode}}"]).stdout.strip()

        def full(key: str) -> bool:
            result = results.get(key)
            return isinstance(result, tuple) and result[0] == 200 and ("generated_text" in result[1] or "choices" in result[1])

        def error_shaped(key: str) -> bool:
            result = results.get(key)
            return isinstance(result, tuple) and result[0] != 200 and _is_error_shape(result[1])

        problems = []
        if exit_code != "0":
            problems.append(f"exit code {exit_code}, expected 0")
        if stop_seconds >= SAGEMAKER_STOP_SECONDS:
            problems.append(f"stop took {stop_seconds:.1f} s (killed at {SAGEMAKER_STOP_SECONDS} s)")
        for key in sorted(results):
            if not (full(key) or (key.startswith("long") and error_shaped(key))):
                problems.append(f"{key}: {str(results[key])[:200]}")
        detail = (f"stop {stop_seconds:.1f} s, exit code {exit_code}; short requests answered in full: "
                  f"{sum(full(k) for k in results if k.startswith('short'))}/2; long requests answered in full: "
                  f"{sum(full(k) for k in results if k.startswith('long'))}/2, ended with an error response: "
                  f"{sum(error_shaped(k) for k in results if k.startswith('long'))}/2")
        if problems:
            raise CheckFailed(f"{detail}: " + "; ".join(problems) + f"\nlogs (end):\n{self.logs()[-1500:]}")
        return detail

    # ---- helpers --------------------------------------------------------------------------------------
    def wait_in_flight(self, count: int) -> None:
        """Until the server reports `count` requests running or queued (its /metrics), at most 60 s."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, text = http("GET", f"{self.base}/metrics", timeout=10)
            in_flight = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith("lmi_num_requests_active "))
            if in_flight >= count:
                return
            time.sleep(0.2)
        print("note: /metrics never showed the requests in flight; stopping anyway", flush=True)

    def running(self) -> bool:
        result = run([self.engine, "inspect", self.name, "--format", "{{.State.Running}}"], check=False)
        return result.stdout.strip() == "true"

    def logs(self) -> str:
        result = run([self.engine, "logs", self.name], check=False)
        return (result.stdout or "") + (result.stderr or "")

    def remove(self) -> None:
        run([self.engine, "rm", "-f", self.name], check=False)

    def left_behind(self) -> None:
        """The images this run built stay for a re-run (--skip-build) unless --cleanup; say which and how big."""
        if not self.made:
            return
        if self.args.cleanup:
            run([self.engine, "rmi", "-f", *self.made], check=False)
            print(f"removed the images this run made: {', '.join(self.made)}")
            return
        sizes = []
        for image in self.made:
            size = run([self.engine, "image", "inspect", image, "--format", "{{.Size}}"], check=False).stdout.strip()
            sizes.append(f"{image} ({int(size) / 1e6:.0f} MB)" if size.isdigit() else image)
        print(f"left behind for a re-run: {', '.join(sizes)}; remove them with: {self.engine} rmi {' '.join(self.made)}"
              " (or pass --cleanup)")

    def main(self) -> int:
        report = self.report
        try:
            if self.args.make_base:
                report.step("base image (mmdebstrap)", self.make_base)
            if not self.args.skip_build:
                report.step("build CPU image", self.build)
            report.step("run (model mounted read-only, OPTION_* set)", self.start)
            report.step("start until /ping is 200", self.wait_healthy)
            report.step("HEALTHCHECK command", self.healthcheck)
            report.step("POST /invocations", self.invocations)
            report.step("POST /v1/chat/completions", self.chat)
            report.step("OPTION_* applied", self.option_applied)
            report.step("non-root processes", self.non_root)
            report.step(f"{self.engine} stop with requests in flight", self.stop_drains)
            passed = True
        except Exception:  # reported by Report.step
            passed = False
        finally:
            if not passed:
                print(self.logs()[-5000:], file=sys.stderr)
            self.remove()
            self.left_behind()
        print("\n" + report.table())
        if self.args.report:
            Path(self.args.report).write_text(json.dumps({"passed": passed, "engine": self.engine,
                                                          "image": self.args.image, "steps": report.steps}, indent=2))
        print("PASSED" if passed else "FAILED")
        return 0 if passed else 1


def _is_error_shape(body: str) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses (sources.list, sources.list.d/*.list one-line entries, or
    *.sources deb822 stanzas), so the made base comes from where this machine's packages come from; the
    public mirror when none is configured."""
    files = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
             *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri, suites, components in _apt_entries(text, deb822=path.suffix == ".sources"):
            if uri.rstrip("/").endswith("/debian") and "main" in components and any(
                    s in ("bookworm", "stable") for s in suites):
                return uri.rstrip("/")
    return FALLBACK_DEBIAN_MIRROR


def _apt_entries(text: str, deb822: bool) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of each binary-package source in an apt sources file."""
    entries = []
    if not deb822:
        for line in text.splitlines():
            words = [w for w in line.split("#")[0].split() if not w.startswith("[")]  # drop [options]
            if len(words) >= 4 and words[0] == "deb":
                entries.append((words[1], [words[2]], words[3:]))
        return entries
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
            for uri in fields.get("uris", "").split():
                entries.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))
    return entries


def private_podman_config(directory: Path) -> dict[str, str]:
    """Write podman's storage and containers configuration for this check into `directory` (its images live
    there too, apart from the machine's) and return the environment that points podman at it."""
    directory.mkdir(parents=True, exist_ok=True)
    storage, containers = directory / "storage.conf", directory / "containers.conf"
    storage.write_text(PODMAN_STORAGE_CONF.format(root=directory.resolve()))
    containers.write_text(PODMAN_CONTAINERS_CONF)
    # buildah's chroot isolation: no user namespaces or OCI runtime needed to run the build's RUN steps
    return {"CONTAINERS_STORAGE_CONF": str(storage), "CONTAINERS_CONF": str(containers), "BUILDAH_ISOLATION": "chroot"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model-dir", required=True, help="a Hugging Face model directory (the embedded model)")
    parser.add_argument("--engine", default=shutil.which("podman") and "podman" or "docker")
    parser.add_argument("--image", default="localhost/lmi-deepspeed:cpu-check")
    parser.add_argument("--base-image", help=f"the CPU image's base (CPU_IMAGE; default {OFFICIAL_BASE_IMAGE}, or "
                        f"{MADE_BASE_IMAGE} with --make-base)")
    parser.add_argument("--make-base", action="store_true",
                        help="make the base from Debian's packages with mmdebstrap (no registry needed) unless it exists")
    parser.add_argument("--debian-mirror", help="Debian mirror for --make-base (default: the one this machine's apt "
                        f"sources name, else {FALLBACK_DEBIAN_MIRROR})")
    parser.add_argument("--podman-config", choices=("system", "private"), default="system",
                        help="private: run podman with a configuration of this check's own (vfs storage, runc, "
                        "nofile/nproc limits; images kept under --podman-dir), for hosts where podman's defaults "
                        "cannot run containers")
    parser.add_argument("--podman-dir", default=str(Path("~/.cache/lmi-deepspeed/podman").expanduser()),
                        help="where --podman-config private keeps its configuration and images")
    parser.add_argument("--cleanup", action="store_true", help="remove the images this run made when it ends")
    parser.add_argument("--wheels", help="a directory of wheels for pip in the build (build context 'wheels')")
    parser.add_argument("--torch-index-url", help="TORCH_INDEX_URL build argument")
    parser.add_argument("--ca-bundle", help="CA bundle for pip in the build, passed as the build secret 'cacert'")
    parser.add_argument("--embedded-model", action="store_true", help="also convert the embedded model into the image")
    parser.add_argument("--skip-build", action="store_true", help="check an image built before")
    parser.add_argument("--context", default=str(REPO), help="build context (default: this repository)")
    parser.add_argument("--build-option", action="append", default=[], help="extra build argument (repeatable)")
    parser.add_argument("--run-option", action="append", default=[], help="extra run argument (repeatable)")
    parser.add_argument("--report", help="write the steps as JSON here")
    args = parser.parse_args(argv)
    if args.base_image is None:
        args.base_image = MADE_BASE_IMAGE if args.make_base else OFFICIAL_BASE_IMAGE
    if args.make_base and args.debian_mirror is None:
        args.debian_mirror = debian_mirror()
    return args


if __name__ == "__main__":
    os.chdir(REPO)
    arguments = parse_args()
    if arguments.podman_config == "private":
        if arguments.engine != "podman":
            sys.exit("--podman-config private is for --engine podman")
        environment = private_podman_config(Path(arguments.podman_dir))
        os.environ.update(environment)
        print(f"podman: a private configuration in {arguments.podman_dir} (vfs storage, runc, nofile/nproc "
              "limits); its images stay there, apart from the machine's", flush=True)
    sys.exit(ContainerCheck(arguments).main())
