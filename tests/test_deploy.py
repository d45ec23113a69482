"""Offline checks of the deployment recipes: nodes/Dockerfile and the Kubernetes manifests under nodes/k8s/.

Two groups of manifests: inference replicas behind a broker (nodes/k8s/*.yaml, jobs/, load/) and a
training group behind a broker of its own (nodes/k8s/training/: torchrun in an Indexed Job).

No cluster and no container runtime run in CI, so nothing here builds an image or applies a manifest.
What can be checked without them is: every manifest against the Kubernetes schemas (strict, so a
misspelt field fails), every `sparse-rt` command line in them through the real CLI into a valid
NodeConfig (and every `torchrun` one through torch's own parser), the selectors, ports and addresses
that tie the objects together, where each node's CURVE keys come from (Secrets the operator creates,
never in the manifests), and what the Dockerfile installs and runs.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, major_minor
from torch.distributed.run import get_args_parser

from sparse_rt.cli import cli, node
from sparse_rt.config import NodeConfig, load_node_config
from sparse_rt.pipeline import get_pipeline

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "nodes" / "k8s"
DOCKERFILE = REPO / "nodes" / "Dockerfile"
DOCKERIGNORE = REPO / "nodes" / "Dockerfile.dockerignore"  # BuildKit's ignore file for nodes/Dockerfile
KUBERNETES_VERSION = "1.30"
NAME, COMPONENT = "app.kubernetes.io/name", "app.kubernetes.io/component"
WORKLOADS = ("Deployment", "Job", "Pod")
TORCHRUN_MODULE = "sparse_rt"  # `python -m sparse_rt` is the `sparse-rt` command (sparse_rt/__main__.py)


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")]):
        with open(path) as file:
            for index, doc in enumerate(yaml.safe_load_all(file)):
                if doc is not None:
                    found.append((f"{path.relative_to(K8S)}#{index}", doc))
    return found


DOCUMENTS = _documents()
DOCS = [doc for _, doc in DOCUMENTS]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in DOCS if doc["kind"] == kind]


def _named(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [doc for doc in _of_kind(kind) if doc["metadata"]["name"] == name]
    return doc


def _pod(doc: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """A workload's pod: its labels and its spec."""
    template = doc if doc["kind"] == "Pod" else doc["spec"]["template"]
    return template["metadata"].get("labels", {}), template["spec"]


def _pods() -> list[tuple[dict[str, Any], dict[str, str], dict[str, Any]]]:
    return [(doc, *_pod(doc)) for doc in DOCS if doc["kind"] in WORKLOADS]


def _of_component(component: str) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    (found,) = [pod for pod in _pods() if pod[1].get(COMPONENT) == component]
    return found


def _selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(match_labels) and match_labels.items() <= labels.items()


def _workload_of(container: dict[str, Any]) -> dict[str, Any]:
    (doc,) = [doc for doc, _, spec in _pods() if any(other is container for other in spec["containers"])]
    return doc


def _torchrun(container: dict[str, Any]) -> argparse.Namespace | None:
    """torchrun's own options, through torch's parser, for a container that runs torchrun; None otherwise."""
    command = container.get("command")
    if not command or command[0] != "torchrun":
        return None
    return get_args_parser().parse_args([*command[1:], *container.get("args", [])])


def _endpoint(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    assert host and port.isdigit(), f"not a HOST:PORT endpoint: {address}"
    return host, int(port)


def _nnodes(launch: argparse.Namespace) -> int:
    """torchrun's --nnodes, N or MIN:MAX: a fixed group size, MIN = MAX (the Job has a fixed number of pods)."""
    low, _, high = launch.nnodes.partition(":")
    assert int(low) == int(high or low), f"--nnodes {launch.nnodes}: an elastic size the Job cannot follow"
    return int(low)


def _check_torchrun(launch: argparse.Namespace, container: dict[str, Any]) -> None:
    """torchrun starting `sparse-rt` as one node of a group that spans its Indexed Job's pods."""
    name = container["name"]
    assert launch.module and not launch.no_python and not launch.run_path, f"{name}: torchrun -m {TORCHRUN_MODULE}"
    assert launch.training_script == TORCHRUN_MODULE and container["command"][-1] == TORCHRUN_MODULE
    assert launch.training_script_args == container.get("args", []), f"{name}: args are all `sparse-rt`'s"
    assert launch.max_restarts >= 1, f"{name}: torchrun must restart the group when a replica dies"
    assert not launch.standalone and launch.rdzv_backend == "c10d", f"{name}: a rendezvous across pods"
    assert launch.rdzv_id != "none", f"{name}: the group's own --rdzv-id"
    env = {item["name"]: item.get("value") for item in container.get("env", [])}
    assert env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1", f"{name}: a fresh store per rendezvous round"
    job = _workload_of(container)
    assert job["kind"] == "Job" and job["spec"].get("completionMode") == "Indexed", \
        f"{name}: pod hostnames JOB-INDEX come with an Indexed Job"
    assert _nnodes(launch) == job["spec"]["completions"], f"{name}: --nnodes is the Job's completions"
    # pod 0 of the Job, by the name its hostname and subdomain give it in the headless Service
    subdomain = job["spec"]["template"]["spec"].get("subdomain")
    service = _named("Service", subdomain)
    assert service["spec"].get("clusterIP") == "None"
    host, port = _endpoint(launch.rdzv_endpoint)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert port in [entry["port"] for entry in service["spec"]["ports"]]


def _invocation(container: dict[str, Any]) -> list[str] | None:
    """The `sparse-rt` arguments a container runs, or None if it runs something else.

    A container may also run `torchrun ... -m sparse_rt` with the `sparse-rt` arguments as its args:
    torchrun's part is checked here (_check_torchrun) and the rest returned.
    """
    command = container.get("command")
    if command is None:  # the image's ENTRYPOINT, `sparse-rt`
        return list(container.get("args", []))
    if command[0] == "sparse-rt":
        return [*command[1:], *container.get("args", [])]
    launch = _torchrun(container)
    if launch is None:
        return None
    _check_torchrun(launch, container)
    return list(launch.training_script_args)


def _cpu(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _tcp(address: str) -> tuple[str, int]:
    match = re.fullmatch(r"tcp://([^:/]+):(\d+)", address)
    assert match, f"not a tcp://HOST:PORT address: {address}"
    return match[1], int(match[2])


def _volume(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (volume,) = [volume for volume in spec.get("volumes", []) if volume["name"] == name]
    return volume


def _node_config(container: dict[str, Any], tmp_path: Path) -> NodeConfig:
    """The container's `sparse-rt node` command line through the real CLI, without running the node.

    The options that must name existing paths (--models, --curve-key, --allow-keys, ...) name the pod's
    mounts; each mount becomes a folder under ``tmp_path``, and a path outside every mount fails here as
    it would in the pod. A secret volume's ``items`` become (empty) files at their paths, as the kubelet
    writes them; one without items is the folder of all its Secret's keys, here an empty one.
    """
    argv = _invocation(container)
    assert argv and argv[0] == "node", f"{container['name']}: expected `sparse-rt node ...`, got {argv}"
    assert cli.get_command(None, "node") is node
    spec = _pod(_workload_of(container))[1]
    mounts = {mount["mountPath"].rstrip("/"): tmp_path / mount["name"] for mount in container.get("volumeMounts", [])}
    for mount in container.get("volumeMounts", []):
        folder = tmp_path / mount["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for item in _volume(spec, mount["name"]).get("secret", {}).get("items", []):
            (folder / item["path"]).parent.mkdir(parents=True, exist_ok=True)
            (folder / item["path"]).touch()

    def local(arg: str) -> str:
        for mount_path, folder in mounts.items():
            if arg == mount_path or arg.startswith(mount_path + "/"):
                return str(folder / arg[len(mount_path):].lstrip("/"))
        return arg

    with node.make_context("node", [local(arg) for arg in argv[1:]]) as ctx:
        params = dict(ctx.params)
    assert params.pop("config_file") is None, "the manifests give every setting on the command line"
    config = load_node_config(None, params)
    for field in ("data", "checkpoint", "metrics", "models", "curve_key", "allow_keys", "allow_infer_keys",
                  "server_key", "allow_replica_keys"):
        path = getattr(config, field)
        assert path is None or any(Path(path).is_relative_to(folder) for folder in mounts.values()), \
            f"{container['name']}: --{field.replace('_', '-')} is on no volume the pod mounts"
    return config


def test_the_manifests_hold_both_groups_brokers_replicas_edges_claims_and_policies():
    names: dict[str, list[str]] = {}
    for doc in DOCS:
        names.setdefault(doc["kind"], []).append(doc["metadata"]["name"])
    assert {kind: sorted(found) for kind, found in names.items()} == {
        "Deployment": ["sparse-rt-broker", "sparse-rt-replica", "sparse-rt-train-broker"],
        "Service": ["sparse-rt-broker", "sparse-rt-train-broker", "sparse-rt-trainer"],
        "Job": ["sparse-rt-edge", "sparse-rt-train-edge", "sparse-rt-trainer"],
        "Pod": ["sparse-rt-load"],
        "NetworkPolicy": ["sparse-rt-broker", "sparse-rt-replica", "sparse-rt-train-broker", "sparse-rt-trainer"],
        "PersistentVolumeClaim": ["sparse-rt-data", "sparse-rt-models", "sparse-rt-state"],
    }  # no ConfigMap: a model set is binary and may outgrow one


def test_the_kubernetes_version_is_one_kubernetes_validate_ships():
    assert KUBERNETES_VERSION in {major_minor(version) for version in all_versions()}


@pytest.mark.parametrize("doc", DOCS, ids=[where for where, _ in DOCUMENTS])
def test_every_document_validates_against_the_kubernetes_schemas(doc):
    # validate() falls back to an older schema when it lacks the one asked for: the returned version says which.
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_every_object_is_labelled_alike_and_names_no_namespace():
    for doc in DOCS:
        metadata = doc["metadata"]
        assert "namespace" not in metadata, f"{metadata['name']}: the manifests are namespace-agnostic"
        assert metadata["name"].startswith("sparse-rt-")
        labels = metadata.get("labels", {})
        assert labels.get(NAME) == "sparse-rt" and labels.get("app.kubernetes.io/part-of") == "sparse-rt"
        assert labels.get(COMPONENT), f"{metadata['name']}: no {COMPONENT} label"
    for doc, labels, _ in _pods():
        assert labels == doc["metadata"]["labels"], f"{doc['metadata']['name']}: its pods are labelled otherwise"


def test_the_workload_selectors_match_their_own_pods_only():
    pods = _pods()
    for doc in _of_kind("Deployment"):
        selector = doc["spec"]["selector"]
        assert set(selector) == {"matchLabels"}
        for other, labels, _ in pods:
            assert _selects(selector["matchLabels"], labels) == (other is doc), doc["metadata"]["name"]
    for doc in _of_kind("Job"):
        assert "selector" not in doc["spec"], "the Job controller makes the Job's own selector"


BROKERS = [("sparse-rt-broker", "broker"), ("sparse-rt-train-broker", "train-broker")]  # Service, component


@pytest.mark.parametrize("service_name, component", BROKERS)
def test_the_broker_service_selects_the_broker_pod_and_its_ports(service_name, component):
    service = _named("Service", service_name)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "5556 must not leave the cluster"
    assert service["spec"].get("clusterIP") != "None", "the edges reach the broker through the Service's address"
    broker, _, _ = _of_component(component)
    for doc, labels, _ in _pods():
        assert _selects(service["spec"]["selector"], labels) == (doc is broker)
    (container,) = _pod(broker)[1]["containers"]
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(service_ports) == {"edges", "replicas"}
    for name, port in service_ports.items():
        target = port["targetPort"]
        assert (container_ports[target] if isinstance(target, str) else target) == container_ports[name]
        assert port["port"] == container_ports[name]


def test_every_sparse_rt_command_line_parses_into_a_valid_node_config(tmp_path):
    roles = []
    for doc, labels, spec in _pods():
        for container in spec["containers"]:
            if _invocation(container) is None:
                assert doc["kind"] == "Pod", f"{doc['metadata']['name']}: a workload that does not run sparse-rt"
                continue
            config = _node_config(container, tmp_path / doc["metadata"]["name"] / container["name"])
            roles.append((labels[COMPONENT], config.role))
            if config.pipeline:
                get_pipeline(config.pipeline)
    assert sorted(roles) == [("broker", "broker"), ("edge", "edge"), ("replica", "server"),
                             ("train-broker", "broker"), ("train-edge", "edge"), ("trainer", "server")]


@pytest.mark.parametrize("service_name, component", BROKERS)
def test_the_broker_binds_the_ports_its_container_and_service_expose(tmp_path, service_name, component):
    doc, _, spec = _of_component(component)
    (container,) = spec["containers"]
    config = _node_config(container, tmp_path)
    assert config.role == "broker"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert _tcp(config.bind) == ("0.0.0.0", ports["edges"])
    assert _tcp(config.backend) == ("0.0.0.0", ports["replicas"])
    assert doc["kind"] == "Deployment" and doc["metadata"]["name"] == service_name
    assert doc["spec"]["replicas"] == 1 and doc["spec"]["strategy"]["type"] == "Recreate", "never two brokers"


def test_the_replicas_join_the_broker_service_with_one_thread_and_one_core(tmp_path):
    doc, _, spec = _of_component("replica")
    assert doc["kind"] == "Deployment" and doc["spec"]["replicas"] == 2
    (container,) = spec["containers"]
    config = _node_config(container, tmp_path)
    service = _named("Service", "sparse-rt-broker")
    (backend,) = [port for port in service["spec"]["ports"] if port["name"] == "replicas"]
    assert _tcp(config.join) == (service["metadata"]["name"], backend["port"])
    assert config.role == "server" and config.bind is None and config.threads == 1
    assert config.curve_key and config.server_key, "CURVE to the broker (where from: the key tests below)"
    assert config.allow_infer_keys and config.allow_keys is None, "this group's edges only infer"
    resources = container["resources"]
    assert _cpu(resources["requests"]["cpu"]) == _cpu(resources["limits"]["cpu"]) == 1
    assert "ports" not in container, "a replica connects out to the broker and listens on nothing"


def test_the_trainers_join_the_train_broker_service_with_one_thread_and_one_core(tmp_path):
    doc, _, spec = _of_component("trainer")
    (container,) = spec["containers"]
    config = _node_config(container, tmp_path)
    service = _named("Service", "sparse-rt-train-broker")
    (backend,) = [port for port in service["spec"]["ports"] if port["name"] == "replicas"]
    assert _tcp(config.join) == (service["metadata"]["name"], backend["port"])
    assert config.role == "server" and config.bind is None and config.threads == 1
    assert config.models is None, "a server with a model set serves inference and joins no group"
    assert config.curve_key and config.server_key, "CURVE to the broker (where from: the key tests below)"
    assert config.allow_keys, "this group's edges train"
    assert config.checkpoint is not None and config.checkpoint_every > 0, "rank 0 keeps the group's checkpoint"
    assert int(_torchrun(container).nproc_per_node) == 1, "one replica per pod, on its one core"
    resources = container["resources"]
    assert _cpu(resources["requests"]["cpu"]) == _cpu(resources["limits"]["cpu"]) == 1
    assert [port["name"] for port in container["ports"]] == ["rendezvous"]


def test_every_torchrun_spans_its_indexed_job_one_node_per_pod():
    launched = [(doc, container) for doc, _, spec in _pods() for container in spec["containers"]
                if _torchrun(container) is not None]
    assert [doc["metadata"]["name"] for doc, _ in launched] == ["sparse-rt-trainer"]
    for doc, container in launched:
        assert _invocation(container)[0] == "node"  # torchrun's part checked there (_check_torchrun)
        launch = _torchrun(container)
        assert _nnodes(launch) == doc["spec"]["completions"] == doc["spec"]["parallelism"], \
            "every node of the group at once: the rendezvous waits for --nnodes"
        assert doc["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure" or "podFailurePolicy" in doc["spec"]


def test_the_headless_service_names_exactly_the_trainer_pods_for_the_rendezvous():
    service = _named("Service", "sparse-rt-trainer")
    assert service["spec"]["clusterIP"] == "None", "headless: each pod's own DNS name, no virtual IP"
    assert service["spec"].get("publishNotReadyAddresses") is True, "pod 0's name resolves before it is Ready"
    trainer, _, spec = _of_component("trainer")
    assert spec["subdomain"] == service["metadata"]["name"]
    for doc, labels, _ in _pods():
        assert _selects(service["spec"]["selector"], labels) == (doc is trainer), doc["metadata"]["name"]
    (container,) = spec["containers"]
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    (port,) = service["spec"]["ports"]
    assert port["name"] == "rendezvous"
    target = port["targetPort"]
    assert (container_ports[target] if isinstance(target, str) else target) == port["port"] == \
        container_ports["rendezvous"] == _endpoint(_torchrun(container).rdzv_endpoint)[1]


def test_the_state_claim_is_read_write_many_at_the_checkpoints_folder_on_every_trainer_pod(tmp_path):
    trainers = [(doc, spec) for doc, labels, spec in _pods() if labels.get(COMPONENT) == "trainer"]
    assert trainers
    for doc, spec in trainers:  # one template for all the Job's pods
        (container,) = spec["containers"]
        where = tmp_path / doc["metadata"]["name"]
        config = _node_config(container, where)
        (mount,) = [mount for mount in container["volumeMounts"] if where / mount["name"] == config.checkpoint.parent]
        assert not mount.get("readOnly"), "rank 0 writes the checkpoint"
        (volume,) = [volume for volume in spec["volumes"] if volume["name"] == mount["name"]]
        assert set(volume) == {"name", "persistentVolumeClaim"} and not volume["persistentVolumeClaim"].get("readOnly")
        claim = _named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["metadata"]["labels"][COMPONENT] == "state"
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "rank 0 may be on either pod; every rank reads it"
        context = spec["securityContext"]
        assert context.get("fsGroup") == context["runAsGroup"], "the claim writable by the image's user"


def test_the_model_set_is_a_read_only_claim_at_slash_models(tmp_path):
    for component in ("replica", "edge"):
        _, _, spec = _of_component(component)
        (container,) = spec["containers"]
        assert _node_config(container, tmp_path / component).models == tmp_path / component / "models"
        (mount,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/models"]
        assert mount.get("readOnly") is True
        (volume,) = [volume for volume in spec["volumes"] if volume["name"] == mount["name"]]
        assert set(volume) == {"name", "persistentVolumeClaim"} and volume["persistentVolumeClaim"]["readOnly"]
        _named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    for _, _, spec in _pods():
        for volume in spec.get("volumes", []):
            assert "configMap" not in volume


@pytest.mark.parametrize("component, service_name, mode", [("edge", "sparse-rt-broker", "infer"),
                                                            ("train-edge", "sparse-rt-train-broker", "train")])
def test_the_edges_connect_to_their_broker_service_four_at_once_in_their_mode(tmp_path, component, service_name,
                                                                              mode):
    doc, _, spec = _of_component(component)
    assert doc["kind"] == "Job" and doc["spec"]["parallelism"] == doc["spec"]["completions"] == 4
    (container,) = spec["containers"]
    config = _node_config(container, tmp_path)
    service = _named("Service", service_name)
    (edges,) = [port for port in service["spec"]["ports"] if port["name"] == "edges"]
    assert _tcp(config.connect) == (service["metadata"]["name"], edges["port"])
    assert config.mode == mode and config.role == "edge"
    # the CIFAR-10 subset the edge reads is on the data claim, mounted read-only
    (data,) = [env["value"] for env in container.get("env", []) if env["name"] == "SPARSE_RT_CIFAR10_SUBSET"]
    (mount,) = [mount for mount in container["volumeMounts"] if data.startswith(mount["mountPath"].rstrip("/") + "/")]
    assert mount.get("readOnly") is True
    (volume,) = [volume for volume in spec["volumes"] if volume["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]
    assert claim["claimName"] == "sparse-rt-data" and claim["readOnly"]


# CURVE keys: files on read-only secret volumes, from Secrets the operator creates (nodes/k8s/README.md, "Keys").
KEY_FILES = ("curve_key", "server_key")  # --curve-key (this node's .key_secret), --server-key (its broker's .key)
KEY_FOLDERS = ("allow_keys", "allow_infer_keys", "allow_replica_keys")  # the allow-lists: folders of .key files
EDGE_LISTS = ("allow_keys", "allow_infer_keys")
GROUPS = {"broker": ("replica", "edge"), "train-broker": ("trainer", "train-edge")}  # broker: its replicas, its edges
# The naming convention: a broker's key Secret PREFIX-broker-key holds NAME.key_secret; its public half,
# NAME.key, is in PREFIX-public-keys, which its replicas and edges mount (never the broker's own Secret).
BROKER_KEY, PUBLIC_KEYS = "-broker-key", "-public-keys"
SECRET_MODES = (0o400, 0o440)  # with the pod's fsGroup: the image's user reads the files, no other user does


def _nodes() -> list[tuple[dict[str, Any], dict[str, str], dict[str, Any], dict[str, Any]]]:
    """Every container that runs `sparse-rt`: (workload, pod labels, pod spec, container)."""
    return [(doc, labels, spec, container) for doc, labels, spec in _pods() for container in spec["containers"]
            if _invocation(container) is not None]


def _keys(container: dict[str, Any], tmp_path: Path) -> tuple[NodeConfig, dict[str, tuple[str, str | None]]]:
    """The node's config and where each of its key options comes from.

    (Secret, key) for a file (--curve-key, --server-key): the secret volume's item at that path;
    (Secret, None) for an allow-list folder, which must be a whole secret volume's mount: every key of
    the Secret a file in it, those added later too, and nothing else. Every one of them must be on a
    read-only mount of a secret volume, without subPath (the kubelet never updates a subPath mount).
    """
    config = _node_config(container, tmp_path)
    spec = _pod(_workload_of(container))[1]
    sources: dict[str, tuple[str, str | None]] = {}
    for field in (*KEY_FILES, *KEY_FOLDERS):
        path = getattr(config, field)
        if path is None:
            continue
        option = f"{container['name']}: --{field.replace('_', '-')}"
        (mount,) = [mount for mount in container["volumeMounts"] if path.is_relative_to(tmp_path / mount["name"])]
        volume = _volume(spec, mount["name"])
        assert set(volume) == {"name", "secret"}, f"{option} is not on a secret volume"
        assert mount.get("readOnly") is True, f"{option}: its mount is not read-only"
        assert not {"subPath", "subPathExpr"} & set(mount), f"{option}: a subPath mount is never updated"
        secret = volume["secret"]
        assert not secret.get("optional"), f"{option}: a pod without its keys must not start"
        where = path.relative_to(tmp_path / mount["name"])
        if field in KEY_FOLDERS:
            assert where == Path("."), f"{option}: the allow-list is the mount itself, its Secret's keys only"
            assert "items" not in secret, f"{option}: items would pin the keys; one added to the Secret must appear"
            sources[field] = (secret["secretName"], None)
        else:
            (item,) = [item for item in secret.get("items", []) if Path(item["path"]) == where]
            sources[field] = (secret["secretName"], item["key"])
    return config, sources


def test_no_secret_is_in_the_manifests_they_only_name_them():
    assert not _of_kind("Secret"), "the operator creates the Secrets from `sparse-rt keys generate`'s files"
    assert [volume for _, _, spec in _pods() for volume in spec.get("volumes", []) if "secret" in volume]


def test_every_node_runs_with_curve_keys_from_read_only_secret_mounts(tmp_path):
    nodes = _nodes()
    assert len(nodes) == 6
    for doc, _, spec, container in nodes:
        name = doc["metadata"]["name"]
        config, sources = _keys(container, tmp_path / name / container["name"])
        assert config.curve_key is not None, f"{name}: runs without CURVE"
        assert sources["curve_key"][1].endswith(".key_secret"), f"{name}: --curve-key is not a .key_secret"
        if config.role != "broker":
            assert sources["server_key"][1].endswith(".key"), f"{name}: --server-key is not a public .key"
        context = spec["securityContext"]
        assert context.get("fsGroup") == context["runAsGroup"], f"{name}: the key files' group is the image user's"
        for volume in spec["volumes"]:
            if "secret" in volume:
                secret = volume["secret"]
                assert secret.get("defaultMode") in SECRET_MODES, f"{name}: {volume['name']} readable by others"
                assert all(item.get("mode", secret["defaultMode"]) in SECRET_MODES for item in secret.get("items", []))


def test_each_nodes_own_key_is_mounted_by_its_own_component_only(tmp_path):
    # a pod that mounted another component's key Secret could pose as it: a replica as its broker, an edge as a replica
    owners: dict[str, set[str]] = {}
    public: set[str] = set()
    for doc, labels, _, container in _nodes():
        _, sources = _keys(container, tmp_path / doc["metadata"]["name"])
        owners.setdefault(sources["curve_key"][0], set()).add(labels[COMPONENT])
        public |= {secret for field, (secret, _) in sources.items() if field != "curve_key"}
    assert len(owners) == len({component for components in owners.values() for component in components}) == 6
    for secret, components in owners.items():
        mounted_by = {labels[COMPONENT] for _, labels, spec in _pods() for volume in spec.get("volumes", [])
                      if volume.get("secret", {}).get("secretName") == secret}
        assert mounted_by == components, f"{secret}: a secret key mounted by {sorted(mounted_by)}"
    assert not public & set(owners), "a Secret with a secret key is never a public key's or an allow-list's"


@pytest.mark.parametrize("broker_component", GROUPS)
def test_the_edges_and_replicas_check_their_own_brokers_public_key(tmp_path, broker_component):
    broker, broker_labels, spec = _of_component(broker_component)
    (container,) = spec["containers"]
    _, broker_keys = _keys(container, tmp_path / broker_component)
    secret, key = broker_keys["curve_key"]
    assert secret.endswith(BROKER_KEY) and key.endswith(".key_secret"), f"{secret}: not PREFIX{BROKER_KEY}"
    public = (secret.removesuffix(BROKER_KEY) + PUBLIC_KEYS, key.removesuffix(".key_secret") + ".key")
    for component in GROUPS[broker_component]:
        _, _, spec = _of_component(component)
        (node_container,) = spec["containers"]
        config, sources = _keys(node_container, tmp_path / component)
        host, _ = _tcp(config.join or config.connect)
        assert _selects(_named("Service", host)["spec"]["selector"], broker_labels), f"{component}: another broker"
        assert sources["server_key"] == public, f"{component}: --server-key is not {public[1]} of Secret {public[0]}"


@pytest.mark.parametrize("broker_component", GROUPS)
def test_the_broker_lets_edges_and_replicas_in_from_separate_secrets_and_its_replicas_share_its_edge_lists(
        tmp_path, broker_component):
    _, _, spec = _of_component(broker_component)
    (container,) = spec["containers"]
    _, broker_keys = _keys(container, tmp_path / broker_component)
    edge_lists = {field: broker_keys[field] for field in EDGE_LISTS if field in broker_keys}
    assert edge_lists and "allow_replica_keys" in broker_keys
    assert broker_keys["allow_replica_keys"][0] not in {secret for secret, _ in edge_lists.values()}, \
        "the replicas' allow-list from the edges' Secret: an edge's key could join as a replica"
    replica_component, _ = GROUPS[broker_component]
    _, _, spec = _of_component(replica_component)
    (replica,) = spec["containers"]
    _, replica_keys = _keys(replica, tmp_path / replica_component)
    assert {field: replica_keys[field] for field in EDGE_LISTS if field in replica_keys} == edge_lists, \
        "a replica checks each edge's role against the same allow-lists as its broker"


def test_the_two_groups_share_no_secret():
    # else an inference edge's key could train the training tail, or an inference replica join the training broker
    mounted = [{volume["secret"]["secretName"] for component in (broker, *members)
                for volume in _of_component(component)[2].get("volumes", []) if "secret" in volume}
               for broker, members in GROUPS.items()]
    assert all(mounted) and not set.intersection(*mounted)


def _ingress_rules(labels: dict[str, str]) -> list[dict[str, Any]]:
    """The ingress rules of every NetworkPolicy that selects these pods; at least one must, for Ingress."""
    policies = [doc for doc in _of_kind("NetworkPolicy") if _selects(doc["spec"]["podSelector"]["matchLabels"], labels)]
    assert policies and all("Ingress" in doc["spec"]["policyTypes"] for doc in policies), labels
    assert all(set(doc["spec"]["podSelector"]) == {"matchLabels"} for doc in policies)
    return [rule for doc in policies for rule in doc["spec"].get("ingress", [])]


def _sources(rule: dict[str, Any]) -> set[str]:
    """The components of the pods a rule's `from` admits; it must name pods of this namespace only."""
    assert rule.get("from"), "a rule without `from` admits every source"
    found = set()
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, "namespaces and IP blocks reach further than the pods named"
        assert set(peer["podSelector"]) == {"matchLabels"}
        found |= {labels[COMPONENT] for _, labels, _ in _pods() if _selects(peer["podSelector"]["matchLabels"], labels)}
    return found


@pytest.mark.parametrize("broker_component, replica_component", [("broker", "replica"), ("train-broker", "trainer")])
def test_only_the_replica_pods_may_reach_their_brokers_backend_port(broker_component, replica_component):
    broker, broker_labels, _ = _of_component(broker_component)
    (container,) = _pod(broker)[1]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    rules = _ingress_rules(broker_labels)

    def admits(rule: dict[str, Any], port: int) -> bool:
        return "ports" not in rule or any(entry.get("port") in (port, *[n for n, p in ports.items() if p == port])
                                          for entry in rule["ports"])

    backend = [rule for rule in rules if admits(rule, ports["replicas"])]
    assert backend, "no rule lets the replicas in"
    for rule in backend:
        assert _sources(rule) == {replica_component}
    assert any(admits(rule, ports["edges"]) and not rule.get("from") for rule in rules), \
        "the edges' port must stay reachable from anywhere"


@pytest.mark.parametrize("component, peers", [("replica", set()), ("trainer", {"trainer"})])
def test_only_a_replicas_own_group_may_connect_to_it(component, peers):
    _, labels, _ = _of_component(component)
    rules = _ingress_rules(labels)
    for rule in rules:
        assert _sources(rule) == peers
    if not peers:
        assert rules == [], "an inference replica listens on nothing: nothing may connect to it"
    else:  # the rendezvous is on its port, but gloo connects on ports chosen at each start
        assert any("ports" not in rule for rule in rules), "every port between the group's pods"


def test_probes_need_no_http():
    for doc, _, spec in _pods():
        for container in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert "httpGet" not in container.get(probe, {}), f"{doc['metadata']['name']}: ZeroMQ speaks no HTTP"
    for _, component in BROKERS:
        _, _, spec = _of_component(component)
        (container,) = spec["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            port = container[probe]["tcpSocket"]["port"]
            assert port in ports or port in ports.values()
    for component in ("replica", "trainer"):
        _, _, spec = _of_component(component)
        (container,) = spec["containers"]
        # no port every pod listens on: no probe, or one that runs a command (replicas.yaml, trainer.yaml say why)
        assert "livenessProbe" not in container or "exec" in container["livenessProbe"]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        instruction, _, arguments = current.strip().partition(" ")
        lines.append((instruction.upper(), arguments.strip()))
        current = ""
    return lines


def test_the_dockerfile_installs_cpu_torch_then_the_repository_as_a_non_root_user():
    steps = _dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [(index, shlex.split(arguments)) for index, (instruction, arguments) in enumerate(steps)
            if instruction == "RUN"]

    def pip_installs(words: list[str]) -> list[list[str]]:
        commands, command = [], []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "||"):
                if command[:2] == ["pip", "install"] or command[:4] == ["python", "-m", "pip", "install"]:
                    commands.append(command)
                command = []
            else:
                command.append(word)
        return commands

    torch_at = [index for index, words in runs for command in pip_installs(words)
                if {"torch", "torchvision"} <= set(command)
                and "https://download.pytorch.org/whl/cpu" in command[command.index("--index-url") + 1:][:1]]
    repo_at = [index for index, words in runs for command in pip_installs(words) if command[-1] == "."]
    assert torch_at and repo_at and torch_at[0] < repo_at[0], "CPU torch first, so `pip install .` keeps it"

    # `pip install .` runs where the repository's files were copied, from a build context at the repo root.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"],
              *(pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"])}
    workdir, copied = "/", set()
    for index, (instruction, arguments) in enumerate(steps[:repo_at[0]]):
        if instruction == "WORKDIR":
            workdir = arguments
        elif instruction == "COPY":
            *sources, destination = shlex.split(arguments)
            assert not any(source.startswith("--") for source in sources), "COPY from the build context only"
            assert destination.startswith(("./", ".")) and not destination.startswith("/"), \
                "COPY into the WORKDIR that `pip install .` runs in"
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the build context (the repository root)"
                copied.add(source.rstrip("/"))
    assert workdir != "/" and needed <= copied, f"not copied: {sorted(needed - copied)}"
    ignored = [line.strip().removeprefix("**/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert not [source for source in copied for pattern in ignored if fnmatch.fnmatch(source, pattern)]

    users = [(index, arguments) for index, (instruction, arguments) in enumerate(steps) if instruction == "USER"]
    assert users and users[-1][0] > repo_at[0], "the image runs as its own user, set after the installs"
    user = users[-1][1].partition(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric uid, so Kubernetes' runAsNonRoot can check it"
    for _, _, spec in _pods():
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == int(user)

    (entrypoint,) = [arguments for instruction, arguments in steps if instruction == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["sparse-rt"]
    assert "sparse-rt" in pyproject["project"]["scripts"]


# Kubernetes' resource.Quantity, which the JSON schemas leave as any string.
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[mkMGTPE])?")


def test_every_resource_quantity_is_one_kubernetes_reads():
    amounts = [doc["spec"]["resources"]["requests"]["storage"] for doc in _of_kind("PersistentVolumeClaim")]
    for _, _, spec in _pods():
        for container in spec["containers"]:
            for bound in container.get("resources", {}).values():
                amounts.extend(bound.values())
    assert amounts and all(QUANTITY.fullmatch(str(amount)) for amount in amounts), amounts


def test_every_container_runs_the_one_image():
    images = {container["image"] for _, _, spec in _pods() for container in spec["containers"]}
    assert len(images) == 1
