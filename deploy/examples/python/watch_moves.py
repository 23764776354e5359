#!/usr/bin/env python3
"""Prints each VIP move the vipsec agent reports, as it happens.

An example of scripting the agent's gRPC API (vipsec.v1.Agent/WatchEvents) from Python
with the official client, `grpcio`. Stubs come from proto/vipsec/v1/agent.proto: generate
them once (see README.md beside this file), or have this script generate them on the fly
when `grpcio-tools` is installed.

    watch_moves.py                                   # the node's Unix socket, as root
    watch_moves.py --endpoint 10.0.0.5:50051 --ca ca.pem   # TCP with TLS (reads only)
    watch_moves.py --all --count 5                   # every event, stop after five lines

The Unix socket needs no extra option: the agent accepts the socket path that grpcio sends
as :authority.
"""

import argparse
import datetime
import importlib
import os
import sys
import tempfile

import grpc

DEFAULT_ENDPOINT = "unix:///run/vipsec/agent.sock"
HERE = os.path.dirname(os.path.abspath(__file__))
# The proto folder of a source checkout (deploy/examples/python -> proto).
DEFAULT_PROTO = os.path.normpath(os.path.join(HERE, "..", "..", "..", "proto"))


def load_stubs(stubs_dir, proto_dir):
    """Imports vipsec.v1 stubs from stubs_dir, or generates them from proto_dir."""
    if stubs_dir:
        sys.path.insert(0, stubs_dir)
    try:
        return (importlib.import_module("vipsec.v1.agent_pb2"),
                importlib.import_module("vipsec.v1.agent_pb2_grpc"))
    except ImportError:
        if stubs_dir:
            sys.path.remove(stubs_dir)
    from grpc_tools import protoc  # grpcio-tools
    out = tempfile.mkdtemp(prefix="vipsec-stubs-")
    proto = os.path.join("vipsec", "v1", "agent.proto")
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", "-I", proto_dir, "-I", well_known,
                      "--python_out=" + out, "--grpc_python_out=" + out, proto])
    if rc != 0:
        raise SystemExit(f"could not generate stubs from {proto_dir}/{proto}")
    sys.path.insert(0, out)
    return (importlib.import_module("vipsec.v1.agent_pb2"),
            importlib.import_module("vipsec.v1.agent_pb2_grpc"))


def channel(args):
    """A channel to the agent: the Unix socket as is, TCP with TLS."""
    if args.endpoint.startswith("unix:"):
        return grpc.insecure_channel(args.endpoint)
    if not args.ca:
        raise SystemExit("TCP endpoints are TLS only: pass --ca (and --cert/--key for changes)")

    def read(path):
        with open(path, "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key) if args.key else None,
        certificate_chain=read(args.cert) if args.cert else None,
    )
    return grpc.secure_channel(args.endpoint.removeprefix("tcp://"), creds)


def when(ts):
    """A protobuf Timestamp as local time with milliseconds."""
    t = datetime.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9)
    return t.strftime("%H:%M:%S.%f")[:-3]


def millis(duration):
    return duration.seconds * 1000 + duration.nanos // 1_000_000


def format_event(pb, ev, all_events=False):
    """One line for an event, or None when it is not a move and all_events is off.

    A move is what an operator follows: the VIP changing owner (OWNER_CHANGED, with the new
    owner and epoch) and the move's timeline once complete (MOVE_COMPLETED, from the old
    node to the new one with the recovery time).
    """
    kind = pb.EventKind.Name(ev.kind).removeprefix("EVENT_KIND_").lower()
    at = when(ev.timestamp)
    if ev.kind == pb.EVENT_KIND_MOVE_COMPLETED and ev.HasField("move"):
        m = ev.move
        src = m.from_node or "?"
        recovery = f"{millis(m.recovery)} ms" if m.HasField("recovery") else "unknown"
        state = "complete" if m.complete else "incomplete"
        steps = ", ".join(mark.step for mark in m.marks)
        return (f"{at} move {m.vip} epoch {m.epoch}: {src} -> {m.to_node}, "
                f"recovery {recovery} ({state}: {steps})")
    if ev.kind == pb.EVENT_KIND_OWNER_CHANGED:
        return f"{at} owner {ev.vip} -> {ev.owner or 'nobody'} (epoch {ev.epoch}) seen by {ev.node}"
    if not all_events:
        return None
    parts = [at, kind]
    if ev.vip:
        parts.append(ev.vip)
    if ev.detail:
        parts.append(ev.detail)
    return " ".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default=os.environ.get("VIPSEC_ENDPOINT", DEFAULT_ENDPOINT),
                   help="unix:///path or host:port (TLS); default %(default)s")
    p.add_argument("--ca", help="CA certificate of the agent's TLS certificate")
    p.add_argument("--cert", help="client certificate (TCP)")
    p.add_argument("--key", help="client key (TCP)")
    p.add_argument("--vip", default="", help="only this VIP's events")
    p.add_argument("--all", action="store_true", help="print every event, not only moves")
    p.add_argument("--count", type=int, default=0, help="stop after this many lines")
    p.add_argument("--stubs", help="folder holding generated vipsec/v1/agent_pb2*.py")
    p.add_argument("--proto", default=DEFAULT_PROTO, help="proto folder to generate stubs from")
    args = p.parse_args(argv)

    pb, rpc = load_stubs(args.stubs, args.proto)
    stub = rpc.AgentStub(channel(args))
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
    print(f"watching {status.node} (vipsec {status.version})", file=sys.stderr, flush=True)
    printed = 0
    try:
        for ev in stub.WatchEvents(pb.WatchEventsRequest(vip=args.vip)):
            line = format_event(pb, ev, args.all)
            if line is None:
                continue
            print(line, flush=True)
            printed += 1
            if args.count and printed >= args.count:
                return 0
    except KeyboardInterrupt:
        return 0
    except grpc.RpcError as e:
        print(f"watch ended: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
