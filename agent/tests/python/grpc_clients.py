"""The agent's API through the official Python client (grpcio), as an operator uses it.

Run by agent/tests/python_clients.rs against two real agents (one on its Unix socket, one on
TCP with TLS and client certificates); exits non-zero on the first failed check.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from google.protobuf.descriptor_pool import DescriptorPool

ap = argparse.ArgumentParser()
ap.add_argument("--socket", required=True)
ap.add_argument("--tcp", required=True)
ap.add_argument("--ca", required=True)
ap.add_argument("--cert", required=True)
ap.add_argument("--key", required=True)
ap.add_argument("--vipsec", required=True)
ap.add_argument("--example", required=True)
ap.add_argument("--stubs", required=True)
args = ap.parse_args()

sys.path.insert(0, args.stubs)
sys.path.insert(0, os.path.dirname(args.example))
from vipsec.v1 import agent_pb2 as pb, agent_pb2_grpc as rpc  # noqa: E402
import watch_moves  # noqa: E402

UNIX = "unix://" + args.socket
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


def code_of(fn):
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def vipsec(*argv, endpoint=UNIX):
    return subprocess.run([args.vipsec, "--endpoint", endpoint, *argv],
                          capture_output=True, text=True, timeout=30)


# 1. The standard way to reach a Unix socket, with no channel option; and the raw path that
#    grpc-java and Bazel send as :authority; and grpc-go's "localhost".
for name, options in [("grpc-core default", []),
                      ("raw socket path", [("grpc.default_authority", args.socket)]),
                      ("localhost", [("grpc.default_authority", "localhost")])]:
    with grpc.insecure_channel(UNIX, options=options) as ch:
        st = rpc.AgentStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10)
        check(st.node == "solo", f"{name}: GetStatus answers ({st.node!r})")

ch = grpc.insecure_channel(UNIX)
agent = rpc.AgentStub(ch)
health = health_pb2_grpc.HealthStub(ch)

# 2. vipsec and the Python client see the same status.
st = agent.GetStatus(pb.GetStatusRequest(), timeout=10)
out = vipsec("status", "--json")
check(out.returncode == 0, f"vipsec status: {out.stderr}")
cli = json.loads(out.stdout)
check(cli["node"] == st.node, "node")
check(cli["mode"] == pb.Mode.Name(st.mode).removeprefix("MODE_").lower(), "mode")
check(cli["store"]["kind"] == st.store.kind and cli["store"]["healthy"] == st.store.healthy,
      "store part")
check([v["address"] for v in cli["hosted_vips"]] == [v.address for v in st.hosted_vips],
      "hosted VIPs")
check(cli["version"] == st.version, "version")

# 3. Health agrees with `vipsec health`, overall and per part.
Serving = health_pb2.HealthCheckResponse.SERVING
NotServing = health_pb2.HealthCheckResponse.NOT_SERVING
cli_health = vipsec("health")
overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
check((overall == Serving) == (cli_health.returncode == 0),
      f"overall health {overall} vs vipsec health rc {cli_health.returncode}")
check(health.Check(health_pb2.HealthCheckRequest(service="vipsec.v1.Agent"),
                   timeout=10).status == overall, "vipsec.v1.Agent = overall")
for part in ["store", "keying", "kernel", "ownership", "runtime"]:
    got = health.Check(health_pb2.HealthCheckRequest(service=part), timeout=10).status
    want = Serving if cli[part]["healthy"] else NotServing
    check(got == want, f"health of {part}: {got} vs status {cli[part]['healthy']}")
check(health.Check(health_pb2.HealthCheckRequest(service="guard"), timeout=10).status
      in (Serving, NotServing), "guard part known")
code, _ = code_of(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10))
check(code == grpc.StatusCode.NOT_FOUND, f"unknown health service: {code}")
watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
check(next(watch).status == overall, "Health/Watch sends the current status first")
watch.cancel()

# 4. Reflection: what grpcurl list/describe use.
db = ProtoReflectionDescriptorDatabase(ch)
services = set(db.get_services())
check({"vipsec.v1.Agent", "grpc.health.v1.Health"} <= services, f"reflection lists {services}")
methods = [m.name for m in DescriptorPool(db).FindServiceByName("vipsec.v1.Agent").methods]
check("WatchEvents" in methods and "GetStatus" in methods, f"reflection describes {methods}")

# 5. Errors and limits.
code, _ = code_of(lambda: agent.Drain(pb.DrainRequest(vip="not-an-ip"), timeout=10))
check(code == grpc.StatusCode.INVALID_ARGUMENT, f"malformed VIP: {code}")
code, _ = code_of(lambda: agent.Drain(pb.DrainRequest(vip="192.0.2.7"), timeout=10))
check(code == grpc.StatusCode.NOT_FOUND, f"unknown VIP: {code}")
code, detail = code_of(lambda: agent.SetLogLevel(
    pb.SetLogLevelRequest(filter="a" * 100_000), timeout=10))
check(code == grpc.StatusCode.INVALID_ARGUMENT and "max_log_filter_len = 4096" in detail
      and "100000 bytes" in detail, f"100,000-byte filter: {code} {detail}")
code, detail = code_of(lambda: agent.ListSas(pb.ListSasRequest(vip="1" * 65), timeout=10))
check(code == grpc.StatusCode.INVALID_ARGUMENT and "max_vip_len" in detail,
      f"long VIP: {code} {detail}")

# Subscribers per client: this process may hold 8 event streams, the 9th is refused.
streams = []
for _ in range(8):
    s = agent.WatchEvents(pb.WatchEventsRequest(), timeout=30)
    s.initial_metadata()  # the server has accepted the stream
    streams.append(s)
code, detail = code_of(lambda: next(agent.WatchEvents(pb.WatchEventsRequest(), timeout=10)))
check(code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_subscribers_per_client = 8" in detail,
      f"9th subscriber: {code} {detail}")
streams.pop().cancel()
deadline = time.monotonic() + 10
while True:  # the server frees the slot when it sees the cancel
    s = agent.WatchEvents(pb.WatchEventsRequest(), timeout=30)
    try:
        s.initial_metadata()
        code = s.code() if s.done() else grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    if code == grpc.StatusCode.OK:
        streams.append(s)
        break
    check(time.monotonic() < deadline, f"a freed subscriber slot is reused ({code})")
    time.sleep(0.05)
for s in streams:
    s.cancel()

# 6. The example client streams real events: a mode change is one.
env = dict(os.environ, PYTHONPATH=args.stubs)
example = subprocess.Popen(
    [sys.executable, args.example, "--endpoint", UNIX, "--stubs", args.stubs, "--all",
     "--count", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
deadline = time.monotonic() + 20
mode = "fast"
while example.poll() is None:  # it may subscribe after the first change: keep changing
    check(time.monotonic() < deadline, "the example printed no event")
    vipsec("mode", mode)
    mode = "normal" if mode == "fast" else "fast"
    time.sleep(0.2)
out, err = example.communicate()
check(example.returncode == 0, f"example exit {example.returncode}: {err}")
check(" mode_changed " in out, f"example printed {out!r}")

# Its move lines, from an event shaped as the agent sends at the end of a move.
ev = pb.Event(kind=pb.EVENT_KIND_MOVE_COMPLETED, vip="192.0.2.100", node="be2")
ev.timestamp.FromSeconds(1_700_000_000)
ev.move.vip, ev.move.epoch, ev.move.from_node, ev.move.to_node = "192.0.2.100", 7, "be1", "be2"
ev.move.complete = True
ev.move.recovery.FromMilliseconds(412)
ev.move.marks.add(step="released", node="be1")
ev.move.marks.add(step="first-traffic", node="fe1")
line = watch_moves.format_event(pb, ev)
check(line.endswith("move 192.0.2.100 epoch 7: be1 -> be2, recovery 412 ms "
                    "(complete: released, first-traffic)"), f"move line {line!r}")
owner = pb.Event(kind=pb.EVENT_KIND_OWNER_CHANGED, vip="192.0.2.100", owner="be2", epoch=7,
                 node="fe1")
check(watch_moves.format_event(pb, owner).endswith("owner 192.0.2.100 -> be2 (epoch 7) seen by fe1"),
      "owner line")
check(watch_moves.format_event(pb, pb.Event(kind=pb.EVENT_KIND_SA_UP)) is None,
      "only moves without --all")

# 7. TCP with TLS: reads with the CA alone, changes with a client certificate.
def tls(with_cert):
    def read(p):
        with open(p, "rb") as f:
            return f.read()
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca),
        private_key=read(args.key) if with_cert else None,
        certificate_chain=read(args.cert) if with_cert else None)
    return grpc.secure_channel(args.tcp, creds)


with tls(True) as tch:
    tagent = rpc.AgentStub(tch)
    check(tagent.GetStatus(pb.GetStatusRequest(), timeout=10).node == "tls", "TLS GetStatus")
    r = tagent.SetMode(pb.SetModeRequest(mode=pb.MODE_FAST), timeout=10)
    check(r.mode == pb.MODE_FAST, "TLS SetMode with a client certificate")
    check(health_pb2_grpc.HealthStub(tch).Check(health_pb2.HealthCheckRequest(), timeout=10)
          .status in (Serving, NotServing), "TLS health")
with tls(False) as tch:
    # The agent asks for client certificates: without one the handshake fails.
    code, _ = code_of(lambda: rpc.AgentStub(tch).GetStatus(pb.GetStatusRequest(), timeout=10))
    check(code == grpc.StatusCode.UNAVAILABLE, f"TLS without a client certificate: {code}")

print(f"python grpc client: all {checks} checks held")
