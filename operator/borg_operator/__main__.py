"""`borg-operator` / `python -m borg_operator`: runs the operator (kopf, standalone, one replica).

    borg-operator [--namespace NS ...] [--metrics-port 8080] [--liveness-port 8081] [--log-format json|text]

Before kopf starts, the command checks that it can reach the apiserver and that the BorgCollective CRD is
served; either failing is one line on stderr and exit status 1 (a bad flag: 2), not a traceback or a watch that
waits forever.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from borg_operator import GROUP, KIND, PLURAL, VERSION
from borgdqn.bad_input import OneLineParser

CRD_FILE = "crds/borg.dev_borgcollectives.yaml"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="borg-operator",
        description="Reconciles BorgCollective resources (borg.dev/v1alpha1) into GPU agents, a Redis replay "
        "memory, Kafka and ECK.")
    parser.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                        help="serve only this namespace (repeatable); default: every namespace")
    parser.add_argument("--metrics-port", type=int, default=8080, metavar="PORT",
                        help="Prometheus metrics on http://ADDRESS:PORT/metrics (0: off; default 8080)")
    parser.add_argument("--liveness-port", type=int, default=8081, metavar="PORT",
                        help="liveness probe on http://ADDRESS:PORT/healthz (0: off; default 8081)")
    parser.add_argument("--bind-address", default="0.0.0.0", metavar="ADDRESS",
                        help="address the metrics and liveness servers listen on (default 0.0.0.0)")
    parser.add_argument("--log-format", choices=("json", "text"), default="json",
                        help="json: one JSON object per line (default); text: key=value")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--resync-seconds", type=float, default=30.0, metavar="S",
                        help="reconcile every collective and refresh its status this often (default 30)")
    parser.add_argument("--allowed-image", dest="allowed_images", action="append", default=[], metavar="REPO",
                        help="an image repository collectives may run (repeatable; '*': any); default: "
                        "this project's agent and memory images and apache/kafka")
    parser.add_argument("--no-memory-fill", dest="memory_fill", action="store_false",
                        help="do not read the memory's fill from Redis for the status")
    parser.add_argument("--standalone", action=argparse.BooleanOptionalAction, default=True,
                        help="run without kopf's peering (the default: one replica)")
    args = parser.parse_args(argv)
    for flag in ("metrics_port", "liveness_port"):
        if not 0 <= getattr(args, flag) <= 65535:
            parser.error(f"--{flag.replace('_', '-')}: {getattr(args, flag)} is not a port")
    if args.resync_seconds <= 0:
        parser.error("--resync-seconds must be > 0")
    return args


class KeyValueFormatter(logging.Formatter):
    """`time=... level=... logger=... object=NS/NAME msg="..."`: one line a log shipper splits on spaces."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname.lower(),
                  "logger": record.name}
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and ref.get("name"):
            fields["object"] = f"{ref.get('namespace') or ''}/{ref['name']}".lstrip("/")
        fields["msg"] = record.getMessage()
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return " ".join(f"{key}={_quote(value)}" for key, value in fields.items())


def _quote(value: str) -> str:
    return value if value and not any(c in value for c in ' "=\n') else json.dumps(value)


def configure_logging(log_format: str, verbose: bool) -> None:
    import kopf

    if log_format == "json":
        kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON)
    else:
        kopf.configure(verbose=verbose, log_format=kopf.LogFormat.PLAIN)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(KeyValueFormatter())
    # The HTTP clients' own chatter (every request at DEBUG, every probe at INFO) is not the operator's.
    for name in ("urllib3", "kubernetes", "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_child_events)


def _quiet_child_events(record: logging.LogRecord) -> bool:
    """Drops kopf's "Handler 'child_changed' succeeded." (one per change of every child: a rollout's worth);
    what the handler does is logged by the reconciler, and its failures still pass."""
    from borg_operator.handlers import CHILD_HANDLER

    return not (record.levelno <= logging.INFO and record.name == "kopf.objects"
                and record.getMessage() == f"Handler '{CHILD_HANDLER}' succeeded.")


def api_client() -> Any:
    """A client for the apiserver: in a pod, the ServiceAccount's; elsewhere $KUBECONFIG or ~/.kube/config."""
    from kubernetes import client, config

    try:
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    except config.ConfigException:
        return config.new_client_from_config()


def check_crd(api: Any, group: str = GROUP, version: str = VERSION, plural: str = PLURAL) -> str | None:
    """None when the BorgCollective CRD is served, else the one line that says what is wrong."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    server = api.configuration.host
    try:
        response = api.call_api(*api.param_serialize("GET", f"/apis/{group}/{version}",
                                                     header_params={"Accept": "application/json"},
                                                     auth_settings=["BearerToken"]), _request_timeout=15)
        body = response.read()
        status = response.status
    except ApiException as err:
        status, body = err.status, b""
    except (HTTPError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        return f"cannot reach the Kubernetes API at {server}: {' '.join(str(reason).split())}"
    missing = (f"the {KIND} CRD is not installed ({plural}.{group}/{version} is not served by {server}); "
               f"install it first: kubectl apply --server-side -f {CRD_FILE}")
    if status == 404:
        return missing
    if status in (401, 403):
        return f"the Kubernetes API at {server} refused the operator's credentials (HTTP {status})"
    if status != 200:
        return f"the Kubernetes API at {server} answered HTTP {status} for /apis/{group}/{version}"
    served = {resource.get("name") for resource in json.loads(body).get("resources", [])}
    return None if plural in served else missing


def fail(message: str) -> int:
    print(f"borg-operator: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from kubernetes import config

    try:
        api = api_client()
    except (config.ConfigException, OSError) as err:
        return fail(f"no Kubernetes configuration (in a pod, or $KUBECONFIG / ~/.kube/config): "
                    f"{' '.join(str(err).split())}")
    problem = check_crd(api)
    if problem is not None:
        return fail(problem)

    import kopf
    from kubernetes.dynamic import DynamicClient

    from borg_operator import handlers, metrics
    from borg_operator.apply import Applier, discovery_cache_file
    from borg_operator.events import EventPoster
    from borg_operator.images import DEFAULT_ALLOWED_IMAGES
    from borg_operator.memory_fill import FillReader
    from borg_operator.reconcile import Reconciler

    configure_logging(args.log_format, args.verbose)
    applier = Applier(DynamicClient(api, cache_file=discovery_cache_file()))
    reconciler = Reconciler(applier, EventPoster(applier), fills=FillReader() if args.memory_fill else None,
                            allowed_images=tuple(args.allowed_images) or DEFAULT_ALLOWED_IMAGES)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, reconciler,
                      handlers.Options(namespaces=tuple(args.namespace), resync_s=args.resync_seconds,
                                       idle_s=min(5.0, args.resync_seconds / 2)))
    try:
        metrics.serve(args.metrics_port, args.bind_address)
    except OSError as err:
        return fail(f"--metrics-port {args.metrics_port}: {err.strerror or err}")
    liveness = f"http://{args.bind_address}:{args.liveness_port}/healthz" if args.liveness_port else None
    kopf.run(registry=registry, standalone=args.standalone, liveness_endpoint=liveness,
             **handlers.namespaces_or_clusterwide(args.namespace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
